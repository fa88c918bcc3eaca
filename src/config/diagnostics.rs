//! Why a job file was refused: [`ConfigError`] with its `file:line:col: key:`
//! rendering, and the translation of TOML/serde messages into job-file terms
//! (including "did you mean" suggestions for unknown keys).

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based line and column (in characters) in a job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

impl Position {
    /// The position of byte offset `offset` in `text`.
    pub fn of_offset(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Position {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a job file could not be loaded.
///
/// Display formats:
/// * `FILE: cannot read: REASON`
/// * `FILE:LINE:COL: invalid TOML: MESSAGE`
/// * `FILE:LINE:COL: KEY: MESSAGE` (or `FILE: KEY: MESSAGE` / `FILE: MESSAGE`
///   when no position or no single key applies)
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The job file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The job file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The job file is not valid TOML.
    #[error("{}invalid TOML: {message}", location(path, position))]
    Syntax {
        /// The job file.
        path: PathBuf,
        /// Where the parser stopped.
        position: Option<Position>,
        /// The parser's message.
        message: String,
    },
    /// The job file is valid TOML but not a valid job description.
    #[error("{}{}{message}", location(path, position), key_prefix(key))]
    Invalid {
        /// The job file.
        path: PathBuf,
        /// The offending key or value, if a position applies.
        position: Option<Position>,
        /// Dotted key path, e.g. `checkpoint.every`, if a single key applies.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The job file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. } => path,
        }
    }

    /// Line and column of the offending key or value, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { position, .. } | ConfigError::Invalid { position, .. } => {
                *position
            }
        }
    }

    /// Dotted path of the offending key, if a single key applies.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => key.as_deref(),
            _ => None,
        }
    }
}

fn location(path: &Path, position: &Option<Position>) -> String {
    match position {
        Some(p) => format!("{}:{p}: ", path.display()),
        None => format!("{}: ", path.display()),
    }
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Error construction

pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
}

impl Ctx<'_> {
    fn pos(&self, span: std::ops::Range<usize>) -> Option<Position> {
        Some(Position::of_offset(self.text, span.start))
    }

    pub(super) fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        message: String,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_path_buf(),
            position: span.and_then(|s| self.pos(s)),
            key: (!key.is_empty()).then(|| key.to_string()),
            message,
        })
    }

    pub(super) fn de_error(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = render_path(e.path());
        let inner = e.into_inner();
        let raw = one_line(inner.message());
        let message = match unknown_field(&raw) {
            Some((field, expected)) => unknown_key_message(&field, &expected),
            None => humanize(&raw),
        };
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            position: inner.span().and_then(|s| self.pos(s)),
            key: (!key.is_empty()).then_some(key),
            message,
        }
    }
}

pub(super) fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Renders a serde path as a dotted TOML key, e.g. `checkpoint.every` or
/// `command[1]`, leaving out the internals of `toml::Spanned`.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&toml_key(key));
            }
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// A key as written in TOML: bare if possible, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" message into
/// the field and the expected names.
fn unknown_field(msg: &str) -> Option<(String, Vec<String>)> {
    if !msg.starts_with("unknown field `") {
        return None;
    }
    let mut quoted = msg.split('`').skip(1).step_by(2).map(str::to_string);
    let field = quoted.next()?;
    Some((field, quoted.collect()))
}

fn unknown_key_message(field: &str, expected: &[String]) -> String {
    let mut msg = format!("unknown key (expected one of: {})", expected.join(", "));
    let best = expected
        .iter()
        .map(|e| (edit_distance(field, e), e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))
        .min_by_key(|(d, _)| *d);
    if let Some((_, e)) = best {
        msg.push_str(&format!("; did you mean `{e}`?"));
    }
    msg
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Rewrites serde's generic "invalid type: X, expected Y" into TOML terms:
/// "expected Y, found X".
fn humanize(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("invalid type: ") else {
        return msg.to_string();
    };
    let Some(split) = rest.rfind(", expected ") else {
        return msg.to_string();
    };
    let (unexpected, expected) = (&rest[..split], &rest[split + ", expected ".len()..]);
    format!(
        "expected {}, found {}",
        toml_expected(expected),
        toml_unexpected(unexpected)
    )
}

fn toml_unexpected(u: &str) -> &str {
    if u.starts_with("string ") {
        "a string"
    } else if u.starts_with("integer ") {
        "an integer"
    } else if u.starts_with("floating point ") {
        "a float"
    } else if u.starts_with("boolean ") {
        "a boolean"
    } else if u == "sequence" {
        "an array"
    } else if u == "map" {
        "a table"
    } else {
        u
    }
}

fn toml_expected(e: &str) -> &str {
    match e {
        "a sequence" => "an array",
        "a map" => "a table",
        "a string" | "a boolean" => e,
        "i8" | "i16" | "i32" | "i64" => "an integer",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer",
        _ if e.starts_with("struct ") => "a table",
        _ => e,
    }
}
