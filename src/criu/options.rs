//! The options supervise passes to CRIU for a job (built from the job file's
//! `[checkpoint]` table by `crate::config`).

/// Default CRIU log level (`checkpoint.log_level`).
pub const DEFAULT_CRIU_LOG_LEVEL: u32 = 2;
/// Largest CRIU log level (`checkpoint.log_level`).
pub const MAX_CRIU_LOG_LEVEL: u32 = 4;

/// CRIU options passed through from the `[checkpoint]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriuOptions {
    /// `--shell-job`: the job is attached to a terminal / session.
    pub shell_job: bool,
    /// `--tcp-established`: checkpoint established TCP connections.
    pub tcp_established: bool,
    /// `--file-locks`: checkpoint file locks.
    pub file_locks: bool,
    /// `--ext-unix-sk`: allow external unix sockets.
    pub ext_unix_sk: bool,
    /// CRIU `-v` log level, `0..=4`.
    pub log_level: u32,
    /// CRIU `--network-lock` method.
    pub network_lock: NetworkLock,
}

impl Default for CriuOptions {
    fn default() -> Self {
        CriuOptions {
            shell_job: false,
            tcp_established: false,
            file_locks: false,
            ext_unix_sk: false,
            log_level: DEFAULT_CRIU_LOG_LEVEL,
            network_lock: NetworkLock::default(),
        }
    }
}

crate::choice::choice_enum! {
    /// CRIU's network lock method (`checkpoint.network_lock`), used with
    /// `tcp_established`.
    NetworkLock, default Nftables {
        /// `iptables`
        Iptables => "iptables",
        /// `nftables` (default)
        Nftables => "nftables",
        /// `skip`: do not lock the network.
        Skip => "skip",
    }
}
