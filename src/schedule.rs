//! When checkpoints are due.
//!
//! A job's checkpoint schedule is a [`ScheduleSpec`]: either a fixed interval
//! (`every = "30s"`) or a cron expression with a seconds field evaluated in an
//! IANA time zone (`cron = "0 */15 * * * *"`, `timezone = "Europe/Berlin"`).
//! A [`Ticker`] turns a spec into a sequence of due times for one job.
//!
//! # Why not `tokio-cron-scheduler`
//!
//! We deliberately do not use the `tokio-cron-scheduler` crate:
//!
//! * it spawns every run of a job without waiting for the previous run to
//!   finish (its issues #50 and #83), so a slow checkpoint could overlap with
//!   the next one — two CRIU dumps of the same process tree at once, or a dump
//!   racing a restore;
//! * repeated jobs can stop firing altogether once a tick falls into the past,
//!   e.g. after a long stall or a clock jump (its issue #113), which for us
//!   would silently mean "no more checkpoints".
//!
//! [`Ticker`] avoids both by construction: the caller asks for the next tick
//! only when it is idle (after a checkpoint or restore has finished), so runs
//! never overlap; the tick it hands out is always strictly after the `now`
//! it is given, so the schedule keeps firing for as long as the job lives.
//! The supervisor gives it the instant the checkpoint *started* (after any
//! wait for a dump slot): ticks that came due before that are skipped and
//! counted, never queued; the next tick may then already be due when the
//! checkpoint ends, and is served at once.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;

/// At most this many cron ticks are counted one by one when a long stall is
/// skipped; past that, [`Ticker`] jumps straight to the first tick after
/// `now` and reports this many skipped ticks (a lower bound).
pub const CRON_SKIP_COUNT_CAP: u64 = 10_000;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// How often checkpoints of one job are due.
// One spec exists per job, so the size difference between variants is
// irrelevant; keeping `cron::Schedule` unboxed keeps pattern matching simple.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleSpec {
    /// A fixed interval. A [`Ticker`] places ticks on the grid
    /// `start + k * interval`, so slow checkpoints skip whole ticks instead
    /// of making the schedule drift. A zero interval is treated as 1 ns.
    Every(Duration),
    /// A cron expression (with a seconds field, 6 or 7 fields as the `cron`
    /// crate parses them) evaluated in time zone `tz`.
    /// `every = "auto"`: the interval is chosen by
    /// [`crate::interval::AutoInterval`] and set on the [`Ticker`] with
    /// [`Ticker::set_interval`]; until then it is `min`.
    Auto(crate::interval::AutoParams),
    Cron {
        /// The expression as written in the job file.
        expr: String,
        /// The parsed expression.
        schedule: cron::Schedule,
        /// The time zone the expression is evaluated in.
        tz: Tz,
    },
}

impl ScheduleSpec {
    /// Parses a cron expression (6 or 7 fields, starting with seconds) for
    /// evaluation in time zone `tz`.
    pub fn cron(expr: &str, tz: Tz) -> Result<ScheduleSpec, cron::error::Error> {
        let schedule = cron::Schedule::from_str(expr)?;
        Ok(ScheduleSpec::Cron {
            expr: expr.to_string(),
            schedule,
            tz,
        })
    }

    /// The first due time strictly after `after`.
    ///
    /// Returns `None` only if a cron expression never fires again (or the
    /// result would not be representable).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ScheduleSpec::Every(_) | ScheduleSpec::Auto(_) => {
                let d = TimeDelta::from_std(nonzero(self.interval()?)).ok()?;
                after.checked_add_signed(d)
            }
            ScheduleSpec::Cron { schedule, tz, .. } => {
                // Around a DST fall-back the cron crate yields both instances
                // of an ambiguous local time, the earlier first, and that one
                // may lie before `after`: skip anything not strictly later.
                schedule
                    .after(&after.with_timezone(tz))
                    .take(8)
                    .map(|t| t.with_timezone(&Utc))
                    .find(|t| *t > after)
            }
        }
    }

    /// The fixed interval, or `min` for `auto`; `None` for cron.
    pub fn interval(&self) -> Option<Duration> {
        match self {
            ScheduleSpec::Every(d) => Some(*d),
            ScheduleSpec::Auto(p) => Some(p.min),
            ScheduleSpec::Cron { .. } => None,
        }
    }

    /// A short human-readable description, e.g. `every 30s` or
    /// `cron '0 */15 * * * *' (UTC)`.
    pub fn describe(&self) -> String {
        match self {
            ScheduleSpec::Every(d) => format!("every {}", humantime::format_duration(*d)),
            ScheduleSpec::Auto(p) => format!(
                "every auto (mtbf {}, between {} and {})",
                humantime::format_duration(p.mtbf),
                humantime::format_duration(p.min),
                humantime::format_duration(p.max)
            ),
            ScheduleSpec::Cron { expr, tz, .. } => format!("cron '{expr}' ({})", tz.name()),
        }
    }
}

impl fmt::Display for ScheduleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

fn nonzero(d: Duration) -> Duration {
    if d.is_zero() {
        Duration::from_nanos(1)
    } else {
        d
    }
}

/// Signed nanoseconds of a time difference, without overflow.
fn delta_nanos(d: TimeDelta) -> i128 {
    i128::from(d.num_seconds()) * NANOS_PER_SEC + i128::from(d.subsec_nanos())
}

/// Keeps the next due time of one job's checkpoints.
///
/// Rules:
/// * a tick never lies in the past when handed out ([`Ticker::new`],
///   [`Ticker::advance`] and [`Ticker::reset`] always leave [`Ticker::due`]
///   strictly after the `now` they were given);
/// * ticks that fell while a checkpoint/restore was running are skipped
///   (counted, so the caller can log them), never queued;
/// * the schedule keeps firing for as long as the job lives (only a cron
///   expression that never fires again yields `None`).
///
/// The ticker never looks at the clock itself; callers pass `now`.
#[derive(Debug, Clone)]
pub struct Ticker {
    spec: ScheduleSpec,
    /// The grid's step for [`ScheduleSpec::Every`] and [`ScheduleSpec::Auto`].
    interval: Option<Duration>,
    /// With a phase `f` in [0, 1), the grid is fixed on the wall clock:
    /// `UNIX epoch + f * interval + k * interval`; without one it starts at
    /// the `now` the ticker was (re)started at.
    phase: Option<f64>,
    /// Grid origin.
    anchor: DateTime<Utc>,
    /// For grids: `due == anchor + index * interval`.
    index: u64,
    due: Option<DateTime<Utc>>,
}

impl Ticker {
    /// Starts a ticker at `now`: the first due time is `spec.next_after(now)`.
    pub fn new(spec: ScheduleSpec, now: DateTime<Utc>) -> Self {
        let mut t = Ticker {
            interval: spec.interval(),
            spec,
            phase: None,
            anchor: now,
            index: 1,
            due: None,
        };
        t.restart(now);
        t
    }

    /// Like [`new`](Ticker::new), but an interval grid is fixed on the wall
    /// clock at `phase` (a fraction of the interval, see
    /// [`crate::interval::phase`]): jobs with different phases tick at
    /// different instants. The first tick is the first grid point at least
    /// one interval after `now` (also after [`reset`](Ticker::reset) and
    /// [`set_interval`](Ticker::set_interval)). Cron schedules ignore the
    /// phase.
    pub fn with_phase(spec: ScheduleSpec, now: DateTime<Utc>, phase: f64) -> Self {
        let mut t = Ticker::new(spec, now);
        t.phase = Some(phase.clamp(0.0, 1.0 - f64::EPSILON));
        t.restart(now);
        t
    }

    /// The current interval of a grid schedule (`None` for cron).
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Changes the interval of a grid schedule: a new grid (with the same
    /// phase) starts at `now`, and the next tick is its first after `now`.
    /// Does nothing for cron or when the interval is unchanged.
    pub fn set_interval(&mut self, d: Duration, now: DateTime<Utc>) {
        if self.interval.is_none() || self.interval == Some(d) {
            return;
        }
        self.interval = Some(d);
        self.restart(now);
    }

    /// A fresh grid (or cron sequence) from `now`.
    fn restart(&mut self, now: DateTime<Utc>) {
        self.index = 1;
        let Some(d) = self.interval else {
            self.anchor = now;
            self.due = self.spec.next_after(now);
            return;
        };
        let step = i128::try_from(nonzero(d).as_nanos()).unwrap_or(i128::MAX);
        self.anchor = match self.phase {
            None => now,
            Some(f) => {
                let off = (f * step as f64) as i128;
                let since = delta_nanos(now - DateTime::<Utc>::UNIX_EPOCH) - off;
                let k = since.div_euclid(step);
                let back = since - k * step; // in [0, step)
                let secs = i64::try_from(back / NANOS_PER_SEC).unwrap_or(0);
                let nanos = u32::try_from(back % NANOS_PER_SEC).unwrap_or(0);
                TimeDelta::new(secs, nanos)
                    .and_then(|b| now.checked_sub_signed(b))
                    .unwrap_or(now)
            }
        };
        // The first tick at least one interval after `now` (as without a
        // phase): a job that just started, was restored or changed its
        // interval is not checkpointed again at once.
        self.index = if self.anchor == now { 1 } else { 2 };
        self.due = grid_point(self.anchor, step, self.index);
    }

    /// The next due time, or `None` if the schedule never fires again.
    pub fn due(&self) -> Option<DateTime<Utc>> {
        self.due
    }

    /// Called when the caller is ready for the next tick (e.g. after a
    /// checkpoint for the current tick finished at `now`).
    ///
    /// Advances [`due`](Ticker::due) to the first tick strictly after `now`
    /// and returns how many ticks were skipped: those `<= now` other than the
    /// current due tick, which counts as served. If the current due time is
    /// still after `now` nothing changes and 0 is returned.
    ///
    /// For intervals this is computed arithmetically (a stall of years costs
    /// nothing); for cron at most [`CRON_SKIP_COUNT_CAP`] ticks are counted.
    pub fn advance(&mut self, now: DateTime<Utc>) -> u64 {
        match self.due {
            Some(due) if due <= now => self.skip_past(now),
            _ => 0,
        }
    }

    /// Re-anchors the schedule at `now`, e.g. after a restore: the next due
    /// time becomes `spec.next_after(now)` (for intervals, a new grid starts
    /// at `now`).
    ///
    /// Returns how many ticks `<= now` were skipped; unlike
    /// [`advance`](Ticker::advance) the current due tick counts as skipped
    /// too, since nothing served it.
    pub fn reset(&mut self, now: DateTime<Utc>) -> u64 {
        let skipped = match self.due {
            Some(due) if due <= now => self.skip_past(now).saturating_add(1),
            _ => 0,
        };
        self.restart(now);
        skipped
    }

    /// Moves `due` (which is `<= now`) to the first tick after `now`;
    /// returns the number of ticks strictly between the old due and the new.
    fn skip_past(&mut self, now: DateTime<Utc>) -> u64 {
        match self.interval {
            Some(d) => {
                let step = i128::try_from(nonzero(d).as_nanos()).unwrap_or(i128::MAX);
                let elapsed = delta_nanos(now - self.anchor).max(0);
                let next = u64::try_from(elapsed / step + 1).unwrap_or(u64::MAX);
                let skipped = next.saturating_sub(self.index).saturating_sub(1);
                self.index = next;
                self.due = grid_point(self.anchor, step, next);
                skipped
            }
            None => {
                let Some(mut t) = self.due else { return 0 };
                let mut skipped = 0;
                loop {
                    match self.spec.next_after(t) {
                        Some(n) if n <= now => {
                            skipped += 1;
                            if skipped >= CRON_SKIP_COUNT_CAP {
                                self.due = self.spec.next_after(now);
                                return skipped;
                            }
                            t = n;
                        }
                        next => {
                            self.due = next;
                            return skipped;
                        }
                    }
                }
            }
        }
    }
}

/// `anchor + k * step_nanos`, or `None` if out of range.
fn grid_point(anchor: DateTime<Utc>, step_nanos: i128, k: u64) -> Option<DateTime<Utc>> {
    let total = step_nanos.checked_mul(i128::from(k))?;
    let secs = i64::try_from(total / NANOS_PER_SEC).ok()?;
    let nanos = u32::try_from(total % NANOS_PER_SEC).ok()?;
    anchor.checked_add_signed(TimeDelta::new(secs, nanos)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn cron(expr: &str, tz: Tz) -> ScheduleSpec {
        ScheduleSpec::cron(expr, tz).unwrap()
    }

    #[test]
    fn every_next_after_is_strictly_after() {
        let spec = ScheduleSpec::Every(secs(30));
        let t = utc("2024-05-01T10:00:00Z");
        assert_eq!(spec.next_after(t), Some(utc("2024-05-01T10:00:30Z")));
        // Zero interval still moves strictly forward.
        let zero = ScheduleSpec::Every(Duration::ZERO);
        assert!(zero.next_after(t).unwrap() > t);
    }

    #[test]
    fn every_grid_does_not_drift() {
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(30)), t0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:30Z")));
        // Checkpoint for the 10:00:30 tick took 1.5 s.
        assert_eq!(tk.advance(utc("2024-05-01T10:00:31.5Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:01:00Z")));
        // Served exactly on time.
        assert_eq!(tk.advance(utc("2024-05-01T10:01:00Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:01:30Z")));
        assert_eq!(tk.advance(utc("2024-05-01T10:01:59.999Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:02:00Z")));
    }

    #[test]
    fn every_stall_of_two_and_a_half_intervals_skips_two_ticks() {
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(10)), t0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:10Z")));
        // The checkpoint started at 10:00:10 and took 25 s: ticks at :20 and
        // :30 fell while it ran.
        assert_eq!(tk.advance(utc("2024-05-01T10:00:35Z")), 2);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:40Z")));
    }

    #[test]
    fn every_tick_at_exactly_now_is_skipped_not_handed_out() {
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(10)), t0);
        assert_eq!(tk.advance(utc("2024-05-01T10:00:30Z")), 2);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:40Z")));
    }

    #[test]
    fn every_long_stall_is_computed_arithmetically() {
        let t0 = utc("2024-01-01T00:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(1)), t0);
        let later = utc("2034-01-01T00:00:00.5Z");
        let start = std::time::Instant::now();
        let skipped = tk.advance(later);
        assert!(start.elapsed() < Duration::from_millis(100));
        let total = (later - t0).num_seconds() as u64; // ticks 1..=total are <= later
        assert_eq!(skipped, total - 1);
        assert_eq!(tk.due(), Some(utc("2034-01-01T00:00:01Z")));
        // Sub-second intervals keep the grid too.
        let mut tk = Ticker::new(ScheduleSpec::Every(Duration::from_millis(250)), t0);
        assert_eq!(tk.advance(utc("2024-01-01T00:00:01.1Z")), 3);
        assert_eq!(tk.due(), Some(utc("2024-01-01T00:00:01.25Z")));
    }

    #[test]
    fn advance_before_due_changes_nothing() {
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(60)), t0);
        assert_eq!(tk.advance(utc("2024-05-01T10:00:59Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:01:00Z")));
    }

    #[test]
    fn reset_reanchors_and_counts_unserved_ticks() {
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::new(ScheduleSpec::Every(secs(10)), t0);
        // Job died, restore finished at :27; ticks :10 and :20 never served.
        assert_eq!(tk.reset(utc("2024-05-01T10:00:27Z")), 2);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:37Z")));
        assert_eq!(tk.advance(utc("2024-05-01T10:00:38Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:47Z")));
        // Reset before anything was due.
        assert_eq!(tk.reset(utc("2024-05-01T10:00:40Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:50Z")));
    }

    #[test]
    fn cron_utc_quarter_hours() {
        let spec = cron("0 */15 * * * *", Tz::UTC);
        assert_eq!(
            spec.next_after(utc("2024-05-01T10:07:00Z")),
            Some(utc("2024-05-01T10:15:00Z"))
        );
        // Strictly after: a due time equal to `after` is not returned.
        assert_eq!(
            spec.next_after(utc("2024-05-01T10:15:00Z")),
            Some(utc("2024-05-01T10:30:00Z"))
        );
        assert_eq!(
            spec.next_after(utc("2024-05-01T10:14:59.999Z")),
            Some(utc("2024-05-01T10:15:00Z"))
        );
    }

    #[test]
    fn cron_in_non_utc_timezone() {
        let spec = cron("0 0 9 * * *", chrono_tz::Europe::Berlin);
        // Winter: CET = UTC+1.
        assert_eq!(
            spec.next_after(utc("2024-01-15T00:00:00Z")),
            Some(utc("2024-01-15T08:00:00Z"))
        );
        // Summer: CEST = UTC+2.
        assert_eq!(
            spec.next_after(utc("2024-07-15T00:00:00Z")),
            Some(utc("2024-07-15T07:00:00Z"))
        );
        // Already past 09:00 Berlin: next day.
        assert_eq!(
            spec.next_after(utc("2024-07-15T07:00:00Z")),
            Some(utc("2024-07-16T07:00:00Z"))
        );
        let ny = cron("0 30 17 * * Fri", chrono_tz::America::New_York);
        let t = chrono_tz::America::New_York
            .with_ymd_and_hms(2024, 3, 8, 17, 30, 0)
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(ny.next_after(utc("2024-03-04T00:00:00Z")), Some(t));
    }

    #[test]
    fn cron_dst_fall_back_never_returns_a_past_instant() {
        // 2024-10-27: Berlin goes from 03:00 CEST back to 02:00 CET, so
        // 02:30 local happens at 00:30Z and again at 01:30Z.
        let spec = cron("0 30 2 * * *", chrono_tz::Europe::Berlin);
        assert_eq!(
            spec.next_after(utc("2024-10-27T00:00:00Z")),
            Some(utc("2024-10-27T00:30:00Z"))
        );
        // During the repeated hour (02:10 CET = 01:10Z) the cron crate first
        // yields 00:30Z, which is in the past; we must return 01:30Z.
        assert_eq!(
            spec.next_after(utc("2024-10-27T01:10:00Z")),
            Some(utc("2024-10-27T01:30:00Z"))
        );
    }

    #[test]
    fn cron_second_granularity() {
        let spec = cron("*/5 * * * * *", Tz::UTC);
        assert_eq!(
            spec.next_after(utc("2024-05-01T10:00:02.5Z")),
            Some(utc("2024-05-01T10:00:05Z"))
        );
        let every_second = cron("* * * * * *", Tz::UTC);
        assert_eq!(
            every_second.next_after(utc("2024-05-01T10:00:00Z")),
            Some(utc("2024-05-01T10:00:01Z"))
        );
        assert_eq!(
            every_second.next_after(utc("2024-05-01T10:00:00.999Z")),
            Some(utc("2024-05-01T10:00:01Z"))
        );

        let mut tk = Ticker::new(spec, utc("2024-05-01T10:00:00Z"));
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:05Z")));
        // Served the :05 tick, finished at :17 — :10 and :15 were skipped.
        assert_eq!(tk.advance(utc("2024-05-01T10:00:17Z")), 2);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:20Z")));
        assert_eq!(tk.advance(utc("2024-05-01T10:00:20Z")), 0);
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:25Z")));
        assert_eq!(tk.reset(utc("2024-05-01T10:00:31Z")), 2); // :25 and :30
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:35Z")));
    }

    #[test]
    fn cron_long_stall_is_capped() {
        let mut tk = Ticker::new(cron("* * * * * *", Tz::UTC), utc("2024-05-01T00:00:00Z"));
        let now = utc("2024-05-03T00:00:00.5Z");
        let skipped = tk.advance(now);
        assert_eq!(skipped, CRON_SKIP_COUNT_CAP);
        assert_eq!(tk.due(), Some(utc("2024-05-03T00:00:01Z")));
    }

    #[test]
    fn cron_that_never_fires_again() {
        let spec = cron("0 0 0 1 1 * 2020", Tz::UTC);
        assert_eq!(spec.next_after(utc("2024-05-01T00:00:00Z")), None);
        let mut tk = Ticker::new(spec, utc("2024-05-01T00:00:00Z"));
        assert_eq!(tk.due(), None);
        assert_eq!(tk.advance(utc("2025-01-01T00:00:00Z")), 0);
        assert_eq!(tk.reset(utc("2025-01-01T00:00:00Z")), 0);
        assert_eq!(tk.due(), None);

        // Fires once more, then never.
        let mut tk = Ticker::new(
            cron("0 0 0 1 1 * 2025", Tz::UTC),
            utc("2024-05-01T00:00:00Z"),
        );
        assert_eq!(tk.due(), Some(utc("2025-01-01T00:00:00Z")));
        assert_eq!(tk.advance(utc("2025-01-01T00:00:03Z")), 0);
        assert_eq!(tk.due(), None);
    }

    #[test]
    fn handed_out_ticks_are_always_in_the_future() {
        let specs = [
            ScheduleSpec::Every(Duration::from_millis(700)),
            cron("*/3 * * * * *", Tz::UTC),
            cron("0 30 2 * * *", chrono_tz::Europe::Berlin),
        ];
        for spec in specs {
            let mut now = utc("2024-10-26T23:59:58Z");
            let mut tk = Ticker::new(spec.clone(), now);
            for step in 0..500u32 {
                now += TimeDelta::milliseconds(i64::from(step % 7) * 613 + 1);
                if step % 50 == 0 {
                    now += TimeDelta::hours(1);
                }
                if step % 97 == 0 {
                    tk.reset(now);
                } else {
                    tk.advance(now);
                }
                assert!(tk.due().unwrap() > now, "{spec}: due not after {now}");
            }
        }
    }

    #[test]
    fn describe() {
        assert_eq!(ScheduleSpec::Every(secs(30)).describe(), "every 30s");
        assert_eq!(ScheduleSpec::Every(secs(5400)).describe(), "every 1h 30m");
        assert_eq!(
            cron("0 */15 * * * *", Tz::UTC).describe(),
            "cron '0 */15 * * * *' (UTC)"
        );
        assert_eq!(
            cron("0 0 9 * * *", chrono_tz::Europe::Berlin).to_string(),
            "cron '0 0 9 * * *' (Europe/Berlin)"
        );
    }

    #[test]
    fn phase_fixes_the_grid_on_the_wall_clock() {
        let spec = ScheduleSpec::Every(secs(10));
        // Phase 0.25 of 10 s: ticks at :02.5, :12.5, ... whenever started;
        // the first at least one interval after the start.
        let mut a = Ticker::with_phase(spec.clone(), utc("2024-05-01T10:00:03Z"), 0.25);
        assert_eq!(a.due(), Some(utc("2024-05-01T10:00:22.5Z")));
        let b = Ticker::with_phase(spec.clone(), utc("2024-05-01T10:00:01Z"), 0.25);
        assert_eq!(b.due(), Some(utc("2024-05-01T10:00:12.5Z")));
        let c = Ticker::with_phase(spec.clone(), utc("2024-05-01T10:00:01Z"), 0.75);
        assert_eq!(c.due(), Some(utc("2024-05-01T10:00:17.5Z")));
        // Exactly on a grid point: the next one.
        let d = Ticker::with_phase(spec, utc("2024-05-01T10:00:02.5Z"), 0.25);
        assert_eq!(d.due(), Some(utc("2024-05-01T10:00:12.5Z")));
        // The grid holds across advance and reset.
        assert_eq!(a.advance(utc("2024-05-01T10:00:33Z")), 1); // :32.5
        assert_eq!(a.due(), Some(utc("2024-05-01T10:00:42.5Z")));
        assert_eq!(a.reset(utc("2024-05-01T10:00:50Z")), 1); // :42.5 never served
        assert_eq!(a.due(), Some(utc("2024-05-01T10:01:02.5Z")));
        assert_eq!(a.advance(utc("2024-05-01T10:01:03Z")), 0);
        assert_eq!(a.due(), Some(utc("2024-05-01T10:01:12.5Z")));
    }

    #[test]
    fn auto_interval_changes_the_grid() {
        let p = crate::interval::AutoParams {
            mtbf: secs(3600),
            max_overhead_ppm: None,
            min: secs(5),
            max: secs(600),
        };
        let t0 = utc("2024-05-01T10:00:00Z");
        let mut tk = Ticker::with_phase(ScheduleSpec::Auto(p), t0, 0.0);
        assert_eq!(tk.interval(), Some(secs(5)));
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:00:05Z")));
        tk.set_interval(secs(60), utc("2024-05-01T10:00:06Z"));
        assert_eq!(tk.interval(), Some(secs(60)));
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:02:00Z")));
        // Unchanged: nothing moves.
        tk.set_interval(secs(60), utc("2024-05-01T10:00:30Z"));
        assert_eq!(tk.due(), Some(utc("2024-05-01T10:02:00Z")));
        // Cron ignores it.
        let mut c = Ticker::new(cron("0 * * * * *", Tz::UTC), t0);
        c.set_interval(secs(5), t0);
        assert_eq!(c.interval(), None);
        assert_eq!(c.due(), Some(utc("2024-05-01T10:01:00Z")));
    }

    #[test]
    fn cron_rejects_five_fields() {
        assert!(ScheduleSpec::cron("*/5 * * * *", Tz::UTC).is_err());
        assert!(ScheduleSpec::cron("0 */5 * * * *", Tz::UTC).is_ok());
        assert!(ScheduleSpec::cron("0 */5 * * * * 2099", Tz::UTC).is_ok());
    }
}
