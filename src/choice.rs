//! Enums spelled as one of a fixed set of strings in a job file.

/// Declares a public enum spelled as one of a fixed set of strings in the
/// job file, with `ALL`, `as_str`, `Display` and `Default`. Its `Deserialize`
/// lives with the job-file parser (`crate::config`).
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        $name:ident, default $default:ident {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// All values with their job-file spelling.
            pub const ALL: &'static [($name, &'static str)] = &[$(($name::$variant, $text),)+];

            /// The job-file spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use choice_enum;
