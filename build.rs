//! Build script: `compile_rpc` generates CRIU's RPC types from the
//! vendored rpc.proto; `detect_criu` sets `cfg(criu)` for the integration
//! tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "regen-rpc")]
    compile_rpc();
    detect_criu();
}

/// Sets `cfg(criu)` when CRIU >= 4.2 runs here and the build runs as root:
/// the integration tests that drive real CRIU are marked
/// `#[cfg_attr(not(criu), ignore = "...")]`, so elsewhere they are reported
/// as ignored instead of passing without having run. With `CI` set, a
/// missing or unusable CRIU fails the build instead.
///
/// The `criu` binary is `$SUPERVISE_CRIU`, else `criu` from `PATH` (as at
/// run time). Reruns when `CI` or `SUPERVISE_CRIU` change, when that binary
/// changes, and, while it is missing, when a directory of `PATH` changes
/// (CRIU installed since).
fn detect_criu() {
    println!("cargo::rustc-check-cfg=cfg(criu)");
    println!("cargo::rustc-check-cfg=cfg(root)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=SUPERVISE_CRIU");

    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let criu = match std::env::var_os("SUPERVISE_CRIU") {
        Some(p) => Some(PathBuf::from(p)),
        None => path_dirs
            .iter()
            .map(|d| d.join("criu"))
            .find(|p| p.is_file()),
    };
    match &criu {
        Some(p) if p.exists() => println!("cargo::rerun-if-changed={}", p.display()),
        Some(_) => {}
        None => {
            for d in &path_dirs {
                if d.is_absolute() && d.is_dir() && d != Path::new("/") {
                    println!("cargo::rerun-if-changed={}", d.display());
                }
            }
        }
    }

    let shown = criu
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let version = criu.as_deref().and_then(|p| {
        let out = Command::new(p).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        // "Version: 4.2.1" (or "Version: 4.2").
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))?
            .trim()
            .to_string();
        let mut parts = v.split('.').map(|n| n.parse::<u32>().ok());
        Some((
            v.clone(),
            parts.next()??,
            parts.next().flatten().unwrap_or(0),
        ))
    });
    let root = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");

    // Unit tests that need root only (chown, /proc/PID/map_files) are
    // ignored, not passed, in a build that does not run as root.
    if root {
        println!("cargo::rustc-cfg=root");
    }
    let problem = match &version {
        None if criu.is_none() => Some("criu is not on PATH".to_string()),
        None => Some(format!("{shown} --version does not run")),
        Some((v, major, minor)) if (*major, *minor) < (4, 2) => {
            Some(format!("{shown} is version {v}"))
        }
        Some(_) if !root => Some("the build does not run as root".to_string()),
        Some(_) => None,
    };
    match problem {
        None => println!("cargo::rustc-cfg=criu"),
        Some(why) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                eprintln!(
                    "error: CI is set but CRIU >= 4.2 is not usable as root: run scripts/setup.sh ({why})"
                );
                std::process::exit(1);
            }
            println!(
                "cargo::warning=CRIU >= 4.2 is not usable as root ({why}): the tests that need it are ignored; run scripts/setup.sh"
            );
        }
    }
}

/// With `--features regen-rpc`: regenerates `src/criu/rpc_gen.rs`, the
/// prost types of CRIU's RPC protocol, from the vendored
/// `src/criu/rpc.proto` (CRIU 4.2.1). protox compiles the proto in Rust:
/// no `protoc` is needed. The header records the proto's SHA-256, which a
/// unit test checks against the proto (src/criu/rpc.rs).
#[cfg(feature = "regen-rpc")]
fn compile_rpc() {
    use sha2_free::hex_sha256;
    const DIR: &str = "src/criu";
    const PROTO: &str = "src/criu/rpc.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("criu_rpc");
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/criu_rpc");
    let fds = protox::compile([PROTO], [DIR]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the types of {PROTO}: {e}"));
    let code = std::fs::read_to_string(out.join("_.rs")).expect("generated code");
    let proto = std::fs::read(PROTO).expect("rpc.proto");
    let header = format!(
        "// Generated from src/criu/rpc.proto (sha256 {})\n// by prost-build 0.13 + protox 0.7: `cargo build --features regen-rpc` rewrites it.\n// Do not edit by hand.\n",
        hex_sha256(&proto)
    );
    std::fs::write("src/criu/rpc_gen.rs", header + &code).expect("write src/criu/rpc_gen.rs");
}

/// SHA-256 without a build dependency: `sha256sum`.
#[cfg(feature = "regen-rpc")]
mod sha2_free {
    pub fn hex_sha256(data: &[u8]) -> String {
        use std::io::Write;
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        c.stdin.take().unwrap().write_all(data).unwrap();
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}
