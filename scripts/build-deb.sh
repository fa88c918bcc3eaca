#!/usr/bin/env bash
# Builds the Debian package target/debian/supervise_<version>-1_<arch>.deb
# (cargo-deb's default place, under $CARGO_TARGET_DIR if set):
#
#   1. installs cargo-deb from crates.io if missing (`cargo install cargo-deb
#      --locked`: built from source, nothing prebuilt is downloaded);
#   2. builds the binary (release; SUPERVISE_DEB_PROFILE=dev: the debug
#      build, stripped) and copies it to target/assets/supervise;
#   3. generates the man page (`supervise man`, gzipped) and the bash, zsh
#      and fish completions (`supervise completions SHELL`) into
#      target/assets/ from that binary;
#   4. runs `cargo deb --no-build`, which packages what
#      [package.metadata.deb] in Cargo.toml lists.
#
# Prints the .deb's path as its last line. Usage: scripts/build-deb.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
log() { printf '[build-deb] %s\n' "$*" >&2; }

command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain (rustup)"; exit 1; }
if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb from crates.io (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked
fi
command -v dpkg-deb >/dev/null 2>&1 || log "note: dpkg-deb not found; cargo-deb uses its own archiver"

target="${CARGO_TARGET_DIR:-$here/target}"
assets="$here/target/assets"
# SUPERVISE_DEB_PROFILE=dev packages the debug build (same code; what the
# test suite builds anyway): scripts/test.sh uses it so CI does not compile
# everything a second time in release mode. The default is release.
profile="${SUPERVISE_DEB_PROFILE:-release}"
case "$profile" in
  release) outdir=release ;;
  dev) outdir=debug ;;
  *) log "SUPERVISE_DEB_PROFILE must be release or dev"; exit 1 ;;
esac
log "building the binary ($profile profile)"
cargo build --profile "$profile" --locked --bin supervise
rm -rf "$assets"
mkdir -p "$assets"
# Copied at once: the packaged files all come from this one binary, even if
# something else rebuilds $target/$outdir/supervise meanwhile.
cp "$target/$outdir/supervise" "$assets/supervise"
bin="$assets/supervise"
if [ "$profile" != release ] && command -v strip >/dev/null 2>&1; then
  strip "$bin"
fi

log "generating the man page and completions"
"$bin" man | gzip -9n >"$assets/supervise.1.gz"
"$bin" completions bash >"$assets/supervise.bash"
"$bin" completions zsh >"$assets/_supervise"
"$bin" completions fish >"$assets/supervise.fish"

log "packaging (cargo deb --no-build)"
# cargo-deb prints the package's path on stdout.
deb="$(cargo deb --no-build --locked | tail -n1)"
[ -f "$deb" ] || { log "no package was written"; exit 1; }
log "built $deb"
echo "$deb"
