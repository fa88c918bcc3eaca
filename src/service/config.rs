//! The daemon's own configuration file (`/etc/supervise/supervise.toml`,
//! or `supervise run --config PATH`): who may use the node service and
//! how much each user may have. A missing file means the defaults.
//!
//! ```toml
//! [service]
//! users_dir = "/var/lib/supervise/users"  # submitted jobs: <users_dir>/<uid>/
//! allow_group = "hpc"                      # only this group may connect (default: every local user)
//! node = "n1"                              # this node's name (default: the host name)
//!
//! [limits]
//! max_jobs_per_user = 16
//! max_image_bytes_per_user = "200G"        # default: no limit
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the daemon's configuration is read from by default.
pub const DEFAULT_CONFIG: &str = "/etc/supervise/supervise.toml";

/// The node service's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Submitted jobs, their state and images: `<users_dir>/<uid>/`.
    pub users_dir: PathBuf,
    /// Only members of this group (and root) may connect; `None`: every
    /// local user.
    pub allow_group: Option<String>,
    /// Jobs a user may have at once.
    pub max_jobs_per_user: usize,
    /// Bytes of images (all of a user's stores on disk) a user may have;
    /// `None`: no limit.
    pub max_image_bytes_per_user: Option<u64>,
    /// This node's name. With `users_dir` shared between nodes (a cluster
    /// file system), each kept job records the node that runs it, and only
    /// that node supervises it again after a restart.
    pub node: String,
}

/// The host name (the default node name).
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            users_dir: PathBuf::from("/var/lib/supervise/users"),
            allow_group: None,
            max_jobs_per_user: 16,
            max_image_bytes_per_user: None,
            node: host_name(),
        }
    }
}

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceConfigError {
    /// It cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// It is not what it should be.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line, when known.
        line: Option<usize>,
        /// What is wrong (naming the key).
        message: String,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    service: Option<RawService>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    users_dir: Option<PathBuf>,
    allow_group: Option<String>,
    node: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_jobs_per_user: Option<usize>,
    max_image_bytes_per_user: Option<String>,
}

impl ServiceConfig {
    /// Reads `path`; a missing file is the defaults. The file must be a
    /// regular file in a trusted place (it decides what users may do).
    pub fn load(path: &Path) -> Result<ServiceConfig, ServiceConfigError> {
        let bytes = match crate::fsutil::read_limited(path, 1 << 20) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ServiceConfig::default())
            }
            Err(source) => {
                return Err(ServiceConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        // It decides what users may do: only from a place no user controls.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::check_trusted("service configuration directory", dir).map_err(|e| {
                ServiceConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: None,
                    message: e.to_string(),
                }
            })?;
        }
        let text = String::from_utf8_lossy(&bytes);
        ServiceConfig::parse(&text, path)
    }

    /// Parses the text of the file `path`.
    pub fn parse(text: &str, path: &Path) -> Result<ServiceConfig, ServiceConfigError> {
        let invalid = |line: Option<usize>, message: String| ServiceConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            message,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            invalid(line, e.message().replace('\n', " "))
        })?;
        let mut c = ServiceConfig::default();
        if let Some(s) = raw.service {
            if let Some(d) = s.users_dir {
                if !d.is_absolute() {
                    return Err(invalid(
                        line_of(text, "users_dir"),
                        "service.users_dir: must be an absolute path".into(),
                    ));
                }
                c.users_dir = d;
            }
            c.allow_group = s.allow_group;
            if let Some(n) = s.node {
                if n.is_empty()
                    || n.len() > 255
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(invalid(
                        line_of(text, "node"),
                        "service.node: must be 1-255 letters, digits, '-', '_' or '.'".into(),
                    ));
                }
                c.node = n;
            }
        }
        if let Some(l) = raw.limits {
            if let Some(n) = l.max_jobs_per_user {
                if n == 0 || n > 10_000 {
                    return Err(invalid(
                        line_of(text, "max_jobs_per_user"),
                        "limits.max_jobs_per_user: must be 1..=10000".into(),
                    ));
                }
                c.max_jobs_per_user = n;
            }
            if let Some(b) = l.max_image_bytes_per_user {
                let n = crate::criu::parse_size(&b).map_err(|e| {
                    invalid(
                        line_of(text, "max_image_bytes_per_user"),
                        format!("limits.max_image_bytes_per_user: {e}"),
                    )
                })?;
                c.max_image_bytes_per_user = Some(n);
            }
        }
        Ok(c)
    }
}

/// The line (1-based) where `key = ` first appears.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_keys() {
        let p = Path::new("/etc/supervise/supervise.toml");
        assert_eq!(
            ServiceConfig::parse("", p).unwrap(),
            ServiceConfig::default()
        );
        let c = ServiceConfig::parse(
            "[service]\nusers_dir = \"/srv/sv\"\nallow_group = \"hpc\"\nnode = \"n7\"\n[limits]\nmax_jobs_per_user = 2\nmax_image_bytes_per_user = \"1G\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.users_dir, Path::new("/srv/sv"));
        assert_eq!(c.allow_group.as_deref(), Some("hpc"));
        assert_eq!(c.node, "n7");
        assert_eq!(c.max_jobs_per_user, 2);
        assert_eq!(c.max_image_bytes_per_user, Some(1 << 30));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("/etc/supervise/supervise.toml");
        let e = ServiceConfig::parse("[limits]\n\nmax_jobs_per_user = 0\n", p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/supervise/supervise.toml:3: limits.max_jobs_per_user: must be 1..=10000"
        );
        let e = ServiceConfig::parse("[service]\nnode = \"a/b\"\n", p)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/supervise/supervise.toml:2: service.node: must be 1-255 letters, digits, '-', \
             '_' or '.'"
        );
        let e = ServiceConfig::parse("[service]\nusers = 1\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/supervise/supervise.toml:2:") && e.contains("users"),
            "{e}"
        );
    }
}
