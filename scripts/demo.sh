#!/usr/bin/env bash
# supervise demo: the seed scenario, end to end, in one command.
#
#   1. setup     scripts/setup.sh (CRIU >= 4.2, release build of supervise)
#   2. prepare   compile examples/counter.c into a fresh work dir, copy
#                examples/counter.toml next to it
#   3. start     `supervise run counter.toml` in the background (log to a file,
#                shown here as it grows)
#   4. wait      until two checkpoints are published
#   5. kill      SIGKILL the counter (its host PID from .supervise/counter/job.json)
#   6. restore   wait until supervise logs "restored"; show that the counter
#                continues from the checkpointed value + 1, not from 0, and
#                that counter.out holds 0, 1, 2, ... exactly once
#   7. stop      SIGTERM supervise: final checkpoint, job stopped, exit 0
#   8. images    `supervise images counter.toml`
#
# Usage: scripts/demo.sh [--clean]
#   --clean   remove the work dir at the end (default: keep it and print its path)
# Environment: DEMO_TIMEOUT (seconds, default 60) bounds every wait.
# Must run as root (CRIU and the job's PID namespace need it).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
clean=0
for arg in "$@"; do
  case "$arg" in
    --clean) clean=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "usage: scripts/demo.sh [--clean]" >&2
      exit 2
      ;;
  esac
done

timeout_s="${DEMO_TIMEOUT:-60}"
bin="$repo/target/release/supervise"
work=""
log=""
sup_pid=""
shown=0 # log lines already shown
t0=$SECONDS

hdr() { printf '\n== %s ==\n' "$*"; }
say() { printf '   %s\n' "$*"; }
die() {
  printf '\ndemo FAILED: %s\n' "$*" >&2
  exit 1
}

# Prints the supervise log lines not shown yet.
show_log() {
  [ -n "$log" ] && [ -f "$log" ] || return 0
  local n
  n=$(wc -l <"$log")
  if [ "$n" -gt "$shown" ]; then
    sed -n "$((shown + 1)),${n}p" "$log" | sed 's/^/   supervise| /'
    shown=$n
  fi
}

# count_log PATTERN: number of log lines containing PATTERN.
count_log() { grep -cF -- "$1" "$log" 2>/dev/null || true; }

# wait_for DESCRIPTION COMMAND...: polls COMMAND every 0.1 s, streaming new log
# lines, until it succeeds; fails after $timeout_s seconds or if supervise exits.
wait_for() {
  local what="$1"
  shift
  local deadline=$((SECONDS + timeout_s))
  until "$@"; do
    show_log
    if [ -n "$sup_pid" ] && ! kill -0 "$sup_pid" 2>/dev/null; then
      die "supervise exited while waiting for: $what"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout_s}s waiting for: $what"
    sleep 0.1
  done
  show_log
}

# json_field FILE KEY: an integer field of a flat JSON object.
json_field() {
  sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9]*\).*/\1/p" "$1"
}

last_value() { tail -n 1 "$work/counter.out" 2>/dev/null || true; }

cleanup() {
  local rc=$?
  set +e
  [ "$rc" -eq 0 ] || show_log
  if [ -n "$sup_pid" ] && kill -0 "$sup_pid" 2>/dev/null; then
    echo "cleanup: stopping supervise (pid $sup_pid)" >&2
    kill -TERM "$sup_pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$sup_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$sup_pid" 2>/dev/null; then
      # supervise did not stop: kill it, then the job's namespace init (which
      # outlives supervise by design; killing it ends the whole job).
      kill -KILL "$sup_pid" 2>/dev/null
      local init
      init=$(json_field "$work/.supervise/counter/job.json" init_pid 2>/dev/null)
      if [ -n "$init" ]; then
        echo "cleanup: killing the job's namespace init (pid $init)" >&2
        kill -KILL "$init" 2>/dev/null
      fi
    fi
    wait "$sup_pid" 2>/dev/null
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ "$clean" -eq 1 ]; then
      rm -rf "$work"
      echo "removed the work dir $work"
    else
      echo "work dir kept for inspection: $work   (remove it with: rm -rf $work)"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || die "run as root: CRIU and the job's PID namespace need it"

# ---------------------------------------------------------------------------
hdr "1. setup (scripts/setup.sh: CRIU >= 4.2, release build)"
bash "$repo/scripts/setup.sh"
[ -x "$bin" ] || die "$bin was not built"
command -v cc >/dev/null 2>&1 || die "no C compiler (cc): apt-get install gcc"

# ---------------------------------------------------------------------------
hdr "2. prepare a fresh work dir"
work="$(mktemp -d "${TMPDIR:-/tmp}/supervise-demo.XXXXXX")"
log="$work/supervise.log"
cc -O2 -o "$work/counter" "$repo/examples/counter.c"
cp "$repo/examples/counter.toml" "$work/counter.toml"
say "work dir: $work"
say "counter.toml:"
grep -v '^#' "$work/counter.toml" | sed '/^$/d; s/^/      /'

# ---------------------------------------------------------------------------
hdr "3. start: supervise run counter.toml (log: $log)"
(cd "$work" && exec "$bin" run counter.toml) >"$log" 2>&1 </dev/null &
sup_pid=$!
say "supervise pid $sup_pid"
wait_for "the job to start" grep -qF " started" "$log"
job_json="$work/.supervise/counter/job.json"
wait_for "$job_json to be written" test -s "$job_json"

# ---------------------------------------------------------------------------
hdr "4. wait for 2 checkpoints (every 2s)"
two_checkpoints() { [ "$(count_log 'checkpoint published')" -ge 2 ]; }
wait_for "2 published checkpoints" two_checkpoints
say "counter is at $(last_value)"

# ---------------------------------------------------------------------------
hdr "5. kill the job: SIGKILL the counter"
say "$job_json: $(cat "$job_json")"
pid=$(json_field "$job_json" host_pid)
ns_pid=$(json_field "$job_json" ns_pid)
[ -n "$pid" ] || die "no host_pid in $job_json"
comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
[ "$comm" = counter ] || die "pid $pid from $job_json is not the counter (comm=${comm:-gone})"
before=$(last_value)
kill -KILL "$pid"
say "sent SIGKILL to pid $pid (pid $ns_pid inside its namespace); counter had printed $before"

# ---------------------------------------------------------------------------
hdr "6. restore"
restored() { [ "$(count_log 'restored')" -ge 1 ]; }
wait_for "the restore" restored
# Give the restored counter time to print a few numbers.
grown() { [ "$(last_value)" -ge $((before + 5)) ] 2>/dev/null; }
wait_for "the restored counter to print again" grown
new_pid=$(json_field "$job_json" host_pid)
new_ns_pid=$(json_field "$job_json" ns_pid)
say "restored job: host pid $new_pid (was $pid), pid $new_ns_pid in its namespace (was $ns_pid)"

# supervise rolled counter.out back to its size at the newest checkpoint
# before CRIU restored the counter at that point, so the file reads 0, 1, 2,
# ... exactly once: no gap, no repeat, no restart from 0.
grep -F "job files rolled back" "$log" >/dev/null || die "supervise did not log rolling back the job's files"
bad=$(awk 'NR - 1 != $1 { print NR; exit }' "$work/counter.out")
[ -z "$bad" ] || die "counter.out line $bad breaks 0, 1, 2, ...: a gap, a repeat or a restart from 0"
say "tail of counter.out:"
tail -n 6 "$work/counter.out" | sed 's/^/      /'
say "the counter had printed up to $before when it was killed. supervise put counter.out"
say "back to its size at the newest checkpoint and CRIU restored the counter at that point,"
say "so it went on from the checkpointed value + 1 (not from 0), and counter.out reads"
say "0, 1, 2, ..., $(last_value) with no gap and no repeat: output is written exactly once."

# ---------------------------------------------------------------------------
hdr "7. stop: SIGTERM to supervise (final checkpoint, job stopped)"
kill -TERM "$sup_pid"
stopped() { ! kill -0 "$sup_pid" 2>/dev/null; }
deadline=$((SECONDS + timeout_s))
until stopped; do
  show_log
  [ "$SECONDS" -lt "$deadline" ] || die "supervise did not exit within ${timeout_s}s of SIGTERM"
  sleep 0.1
done
rc=0
wait "$sup_pid" || rc=$?
sup_pid=""
show_log
[ "$rc" -eq 0 ] || die "supervise exited with status $rc"
say "supervise exited with status 0"
if kill -0 "$new_pid" 2>/dev/null; then die "the counter (pid $new_pid) still runs"; fi
say "the counter (pid $new_pid) is gone; job.json removed: $([ -e "$job_json" ] && echo no || echo yes)"

# ---------------------------------------------------------------------------
hdr "8. images: supervise images counter.toml"
(cd "$work" && "$bin" images counter.toml) | sed 's/^/   /'

hdr "done in $((SECONDS - t0))s"
say "supervise log:  $log"
say "counter output: $work/counter.out"
say "images:         $work/images"
say "state dir:      $work/.supervise/counter"
