//! What the long-running examples (`soak`, `load`) share: the supervise
//! binary to run, a temp dir with the demo counter compiled into it, and
//! fields of `/proc/<pid>/status`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `$SUPERVISE_BIN`, else `target/release/supervise` (which must exist).
pub fn supervise_bin() -> PathBuf {
    let bin = std::env::var_os("SUPERVISE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/supervise"));
    assert!(
        bin.exists(),
        "{} missing: cargo build --release (or set SUPERVISE_BIN)",
        bin.display()
    );
    bin
}

/// The repository.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temp dir named `<prefix>...` with `examples/counter.c` compiled
/// into it as `counter`.
pub fn workdir_with_counter(prefix: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(tmp.path().join("counter"))
        .arg(root().join("examples/counter.c"))
        .status()
        .unwrap();
    assert!(st.success(), "compiling examples/counter.c");
    tmp
}

/// The first number of the `key` line of `/proc/<pid>/status` (e.g.
/// `"VmRSS:"` in kB, `"Threads:"`); 0 if absent.
pub fn proc_status(pid: i32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
