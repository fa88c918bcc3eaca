#!/usr/bin/env bash
# supervise setup: installs what is missing on a Debian 12 machine, idempotently,
# and builds the release binary.
#
#   CRIU >= 4.2 is required on kernels >= 6.x here (Debian 12's 3.17 fails with a
#   vDSO error; 4.1.1 cannot dump inet sockets on >= 6.16). Debian testing
#   ("forky") carries 4.2.x: we add that suite at a low pin priority so nothing
#   else is pulled from it unless asked, then `apt-get install -t forky criu`.
#   CRIU is never built from source.
#
# Usage: scripts/setup.sh [--no-build]
set -euo pipefail

MIN_CRIU=40200   # 4.2.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build=1
[ "${1:-}" = "--no-build" ] && build=0

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    log "must run as root (or with sudo) to install packages"; exit 1; fi
fi

criu_version_num() {
  # prints e.g. 40201 for "Version: 4.2.1", or 0 if criu is absent
  local v
  v="$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')" || true
  [ -n "$v" ] || { echo 0; return; }
  local IFS=.
  read -r a b c <<<"$v"
  echo $(( ${a:-0} * 10000 + ${b:-0} * 100 + ${c:-0} ))
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}

need_pkgs=()
for p in criu python3-pycriu libcriu-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done

if [ "$(criu_version_num)" -lt "$MIN_CRIU" ] || [ "${#need_pkgs[@]}" -gt 0 ]; then
  # Debian testing at low priority: only packages we ask for with -t forky come from it.
  if [ ! -f /etc/apt/sources.list.d/supervise-forky.sources ]; then
    log "adding Debian testing (forky) at pin priority 100"
    $SUDO tee /etc/apt/sources.list.d/supervise-forky.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO tee /etc/apt/preferences.d/supervise-forky >/dev/null <<'PIN'
Package: *
Pin: release n=forky
Pin-Priority: 100
PIN
  fi
  apt_update
  log "installing criu (forky) ${need_pkgs[*]:-}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t forky criu python3-pycriu libcriu-dev >/dev/null
fi

# criu from forky needs libnl-3-200 >= 3.11, so the rest of the libnl family
# (libnl-route-3-200, ...) must come from forky too, or nothing that links
# it installs any more (Debian's OpenMPI: "libnl-route-3-200 : Depends:
# libnl-3-200 (= 3.7.0-0.2+b1) but 3.12.0-2+b1 is to be installed").
if [ -f /etc/apt/sources.list.d/supervise-forky.sources ] &&
   [ ! -f /etc/apt/preferences.d/supervise-forky-libnl ]; then
  log "pinning the libnl family to forky (it follows criu's libnl-3-200)"
  $SUDO tee /etc/apt/preferences.d/supervise-forky-libnl >/dev/null <<'PIN'
# The libnl family follows libnl-3-200, which criu from forky needs at
# >= 3.11: all of it from forky, so that packages linking libnl-route and
# friends (e.g. Debian's OpenMPI) still install.
Package: src:libnl3
Pin: release n=forky
Pin-Priority: 990
PIN
  apt_updated=0
  apt_update
fi
# Upgrade any member of the family already installed from bookworm.
old_nl=$(dpkg-query -W -f='${Package} ${Version} ${Status}\n' 'libnl-*' 2>/dev/null |
  awk '$NF == "installed" && $2 !~ /^3\.1[1-9]/ {print $1}' | tr '\n' ' ')
if [ -n "${old_nl// /}" ]; then
  apt_update
  log "upgrading $old_nl from forky"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t forky $old_nl >/dev/null
fi

# `man` for tests/package.rs (man -P cat supervise on the installed package).
if ! command -v man >/dev/null 2>&1; then
  apt_update
  log "installing man-db"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq man-db >/dev/null
fi

v="$(criu_version_num)"
if [ "$v" -lt "$MIN_CRIU" ]; then
  log "criu $(criu --version 2>/dev/null | awk '/^Version:/ {print $2}') is older than 4.2; supervise cannot work on this kernel"
  exit 1
fi
log "criu $(criu --version | awk '/^Version:/ {print $2}') OK"

if [ "$build" -eq 1 ]; then
  command -v cargo >/dev/null 2>&1 || { log "cargo not found: install a Rust toolchain (rustup)"; exit 1; }
  log "building release binary"
  (cd "$here" && cargo build --release --quiet --bins)
  log "built $here/target/release/supervise"
fi
