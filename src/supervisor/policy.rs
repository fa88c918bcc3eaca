//! The restart policy, without side effects: given how the job ended and
//! what happened before, decide whether to restore it, after what delay,
//! or to give up; and which control commands the current state admits.
//! The supervisor loop ([`super::Supervisor`]) carries the decisions out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{RestoreConfig, RestoreOn};
use crate::reaper::ExitStatus;

/// What to do after the job's root ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The job ended in a way that needs no restore: supervision ends.
    Complete,
    /// Give up on the job, for this reason.
    GiveUp(String),
    /// Restore it after this delay (zero: at once).
    Restore {
        /// The back-off before the restore.
        delay: Duration,
    },
}

/// The restore delay for the `consecutive`-th death in a crash loop
/// (1: the first death soon after a restore): `backoff`, doubling each
/// time, capped at `backoff_max`.
pub fn restore_delay(consecutive: u32, backoff: Duration, backoff_max: Duration) -> Duration {
    let exp = consecutive.saturating_sub(1).min(30);
    backoff.saturating_mul(1u32 << exp).min(backoff_max)
}

/// What the policy remembers between deaths.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// When automatic restores were started, within the window.
    restores: VecDeque<Instant>,
    /// Deaths in a row without a healthy run (`healthy_after`) between.
    consecutive: u32,
}

impl History {
    /// The job's root ended with `status` after running for `ran`. Decides
    /// what to do; a [`Decision::Restore`] is counted against
    /// `max_restores` within `window` from `now`.
    pub fn on_death(
        &mut self,
        p: &RestoreConfig,
        status: ExitStatus,
        ran: Duration,
        now: Instant,
    ) -> Decision {
        let wanted = match p.on {
            RestoreOn::Never => false,
            RestoreOn::Failure => !status.success(),
            RestoreOn::Always => true,
        };
        if !wanted {
            return if status.success() {
                Decision::Complete
            } else {
                Decision::GiveUp(format!("job ended ({status}) and restore.on = never"))
            };
        }
        while self
            .restores
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > p.window)
        {
            self.restores.pop_front();
        }
        if self.restores.len() as u32 >= p.max_restores {
            return Decision::GiveUp(format!(
                "job died {} times within {}; giving up (restore.max_restores)",
                self.restores.len() + 1,
                humantime::format_duration(p.window)
            ));
        }
        // The first death after a healthy run (or the first ever) is
        // restored at once; each one soon after that restore is a crash
        // loop, and backs off.
        if ran >= p.healthy_after {
            self.consecutive = 0;
        }
        self.consecutive += 1;
        let delay = match self.consecutive {
            1 => Duration::ZERO,
            n => restore_delay(n - 1, p.backoff, p.backoff_max),
        };
        self.restores.push_back(now + delay);
        Decision::Restore { delay }
    }

    /// `supervise start`: a fresh start forgets earlier deaths.
    pub fn reset(&mut self) {
        self.restores.clear();
        self.consecutive = 0;
    }

    /// Automatic restores counted in the current window.
    #[cfg(test)]
    pub fn counted(&self) -> usize {
        self.restores.len()
    }
}

/// The control commands, as far as admission is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `supervise checkpoint`.
    Checkpoint,
    /// `supervise stop`.
    Stop,
    /// `supervise start`.
    Start,
    /// `supervise restore` (admitted whether the job runs or not).
    Restore,
    /// `supervise cancel` (admitted whether the job runs or not).
    Cancel,
}

/// Whether `verb` may run now, with the job running or stopped; the refusal
/// says why. (A command never overlaps a step: the loop takes commands
/// only between steps.)
pub fn admit(verb: Verb, running: bool) -> Result<(), &'static str> {
    match (verb, running) {
        (Verb::Checkpoint, false) => Err("the job is stopped; start it first"),
        (Verb::Stop, false) => Err("the job is already stopped"),
        (Verb::Start, true) => Err("the job is already running"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestoreConfig {
        RestoreConfig {
            on: RestoreOn::Failure,
            max_restores: 3,
            window: Duration::from_secs(600),
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            healthy_after: Duration::from_secs(10),
            lazy: true,
        }
    }

    /// The issue-26 case: a job that ran for hours dies; the restore is
    /// at once. The restored job dies again 14 s later (healthy): at once
    /// again. Then 2 s after that restore (a crash loop): the backoff.
    #[test]
    fn a_death_after_a_healthy_run_restores_at_once() {
        let mut p = policy();
        p.max_restores = 10;
        let mut h = History::default();
        let t0 = Instant::now();
        let mut delay = |ran: u64, at: u64| match h.on_death(
            &p,
            KILLED,
            Duration::from_secs(ran),
            t0 + Duration::from_secs(at),
        ) {
            Decision::Restore { delay } => delay.as_millis(),
            d => panic!("{d:?}"),
        };
        assert_eq!(delay(7200, 7200), 0);
        assert_eq!(delay(14, 7214), 0);
        assert_eq!(delay(2, 7216), 200);
        assert_eq!(delay(1, 7217), 400);
    }

    const KILLED: ExitStatus = ExitStatus::Signal(9);

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(10);
        assert_eq!(restore_delay(1, b, m), Duration::from_secs(1));
        assert_eq!(restore_delay(2, b, m), Duration::from_secs(2));
        assert_eq!(restore_delay(4, b, m), Duration::from_secs(8));
        assert_eq!(restore_delay(5, b, m), m);
        assert_eq!(restore_delay(500, b, m), m);
        assert_eq!(restore_delay(0, b, m), b);
    }

    #[test]
    fn crash_loop_backs_off_then_gives_up() {
        let p = policy();
        let mut h = History::default();
        let t0 = Instant::now();
        let short = Duration::from_millis(50);
        let mut delays = Vec::new();
        for i in 0..3 {
            match h.on_death(&p, KILLED, short, t0 + Duration::from_secs(i)) {
                Decision::Restore { delay } => delays.push(delay.as_millis()),
                d => panic!("death {i}: {d:?}"),
            }
        }
        assert_eq!(delays, [0, 200, 400]);
        match h.on_death(&p, KILLED, short, t0 + Duration::from_secs(4)) {
            Decision::GiveUp(r) => assert_eq!(
                r,
                "job died 4 times within 10m; giving up (restore.max_restores)"
            ),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn window_slides_and_a_long_run_resets_the_backoff() {
        let p = policy();
        let mut h = History::default();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(matches!(
                h.on_death(&p, KILLED, Duration::ZERO, t0 + Duration::from_secs(i)),
                Decision::Restore { .. }
            ));
        }
        // Eleven minutes later the three restores left the 10-minute window.
        let later = t0 + Duration::from_secs(660);
        assert_eq!(
            h.on_death(&p, KILLED, Duration::from_secs(600), later),
            Decision::Restore {
                delay: Duration::ZERO
            },
            "a healthy run: restored at once, the backoff starts over"
        );
        assert_eq!(h.counted(), 1);
    }

    #[test]
    fn clean_exit_completes_and_never_gives_up() {
        let mut p = policy();
        let mut h = History::default();
        let now = Instant::now();
        assert_eq!(
            h.on_death(&p, ExitStatus::Code(0), Duration::ZERO, now),
            Decision::Complete
        );
        p.on = RestoreOn::Never;
        assert!(matches!(
            h.on_death(&p, ExitStatus::Code(3), Duration::ZERO, now),
            Decision::GiveUp(r) if r.contains("restore.on = never")
        ));
        p.on = RestoreOn::Always;
        assert!(matches!(
            h.on_death(&p, ExitStatus::Code(0), Duration::ZERO, now),
            Decision::Restore { .. }
        ));
    }

    #[test]
    fn start_resets_and_commands_are_admitted_by_state() {
        let p = policy();
        let mut h = History::default();
        let now = Instant::now();
        for _ in 0..3 {
            h.on_death(&p, KILLED, Duration::ZERO, now);
        }
        h.reset();
        assert_eq!(h.counted(), 0);
        assert!(matches!(
            h.on_death(&p, KILLED, Duration::ZERO, now),
            Decision::Restore { delay } if delay.is_zero()
        ));
        assert!(admit(Verb::Checkpoint, true).is_ok());
        assert!(admit(Verb::Checkpoint, false).is_err());
        assert!(admit(Verb::Stop, false).is_err());
        assert!(admit(Verb::Start, true).is_err());
        assert!(admit(Verb::Start, false).is_ok());
        assert!(admit(Verb::Restore, false).is_ok());
        assert!(admit(Verb::Restore, true).is_ok());
    }
}
