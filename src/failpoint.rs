//! Test points: named places in supervise where a test can stop the
//! process or hold it, to act in a precise window. One mechanism, two
//! actions, chosen by environment variables (unset in production: a
//! point then costs one environment lookup):
//!
//! * `SUPERVISE_FAILPOINT=<name>`: the process SIGKILLs itself at the
//!   point (crash testing: `commit-after-pack`, `retain-after-rename`,
//!   `gc-after-repack`, `gc-between-index-and-pack`).
//! * `SUPERVISE_PAUSE=<name>` with `SUPERVISE_PAUSE_FILE=F`: the step
//!   creates `F.reached` and waits (at most 60 s) while `F` exists
//!   (`after-rollback`: an attacker swaps a file between the rollback and
//!   CRIU's reopen; `lazy-push`: supervise is killed in the middle of a
//!   lazy restore's background push; `post-dump`: CRIU waits for the
//!   answer to its post-dump notification, the job frozen; `after-dump`:
//!   CRIU's dump is done, before the commit).

use std::path::PathBuf;

/// Environment variable naming the point to die at.
pub const FAIL_ENV: &str = "SUPERVISE_FAILPOINT";
/// Environment variable naming the point to pause at.
pub const PAUSE_ENV: &str = "SUPERVISE_PAUSE";
/// Environment variable naming the file whose existence holds the pause.
pub const PAUSE_FILE_ENV: &str = "SUPERVISE_PAUSE_FILE";

/// The point `name`: dies or pauses here if a test asked for it.
pub fn point(name: &str) {
    if std::env::var_os(FAIL_ENV).is_some_and(|v| v == name) {
        tracing::warn!(
            failpoint = name,
            "SUPERVISE_FAILPOINT reached: killing this process"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if !std::env::var_os(PAUSE_ENV).is_some_and(|v| v == name) {
        return;
    }
    let Some(file) = std::env::var_os(PAUSE_FILE_ENV).map(PathBuf::from) else {
        return;
    };
    if !file.exists() {
        return;
    }
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, name);
    tracing::warn!(
        pause = name,
        "SUPERVISE_PAUSE reached: waiting for the test"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
