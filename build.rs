//! Build script.

fn main() {
    compile_rpc();
}

/// Generates the prost types of CRIU's RPC protocol from the vendored
/// `src/criu/rpc.proto` (CRIU 4.2.1) into `$OUT_DIR/criu_rpc/_.rs` (the file
/// has no `package`), which `src/criu/rpc.rs` includes. protox compiles the
/// proto in Rust: no `protoc` is needed.
fn compile_rpc() {
    const DIR: &str = "src/criu";
    const PROTO: &str = "src/criu/rpc.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let out =
        std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("criu_rpc");
    std::fs::create_dir_all(&out).expect("create $OUT_DIR/criu_rpc");
    let fds = protox::compile([PROTO], [DIR]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    prost_build::Config::new()
        .out_dir(&out)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the types of {PROTO}: {e}"));
}
