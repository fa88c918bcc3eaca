#!/usr/bin/env bash
# The project's test command (also what CI runs, via .ci/run):
#
#   1. scripts/setup.sh --no-build   installs CRIU >= 4.2 if missing (idempotent)
#   2. cargo fmt --all -- --check
#   3. cargo clippy --all-targets -- -D warnings
#   4. scripts/build-deb.sh          the Debian package (of the test build), once;
#                                    tests/package.rs installs it ($SUPERVISE_DEB)
#   5. cargo nextest run --all-targets   (.config/nextest.toml: two slots
#                                        shared by every test binary; plain
#                                        `cargo test --all-targets --
#                                        --test-threads=2` where nextest is
#                                        not installed)
#
# The integration tests drive real CRIU against real processes: run this as
# root on Linux. Usage: scripts/test.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
section() { printf '\n==== %s ====\n' "$*"; }
step_ok() { printf '==== ok: %s (%ss)\n' "$1" "$((SECONDS - $2))"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "warning: not running as root: the integration tests need root (CRIU, PID namespaces)" >&2
fi
command -v cargo >/dev/null 2>&1 || {
  echo "error: cargo not found: install a Rust toolchain (rustup)" >&2
  exit 1
}

section "1/5 setup (scripts/setup.sh --no-build)"
t=$SECONDS
bash scripts/setup.sh --no-build
step_ok setup "$t"

section "2/5 format (cargo fmt --all -- --check)"
t=$SECONDS
cargo fmt --all -- --check
step_ok fmt "$t"

section "3/5 lint (cargo clippy --all-targets -- -D warnings)"
t=$SECONDS
cargo clippy --all-targets -- -D warnings
step_ok clippy "$t"

section "4/5 package (scripts/build-deb.sh, from the test build)"
t=$SECONDS
# The tests' debug build is packaged (SUPERVISE_DEB_PROFILE=dev: same code,
# no second, release-mode compile of everything); scripts/build-deb.sh
# alone builds the release package.
cargo test --all-targets --no-run
SUPERVISE_DEB="$(SUPERVISE_DEB_PROFILE=dev bash scripts/build-deb.sh | tail -n1)"
export SUPERVISE_DEB
step_ok "package $SUPERVISE_DEB" "$t"

t=$SECONDS
if cargo nextest --version >/dev/null 2>&1; then
  section "5/5 tests (cargo nextest run --all-targets)"
  cargo nextest run --all-targets
else
  section "5/5 tests (cargo test --all-targets -- --test-threads=2; cargo-nextest not found)"
  cargo test --all-targets -- --test-threads=2
fi
step_ok tests "$t"

printf '\n==== all checks passed in %ss ====\n' "$((SECONDS - started))"
