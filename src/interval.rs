//! The checkpoint interval supervise picks by itself (`every = "auto"`).
//!
//! # The formula
//!
//! With C the cost of one checkpoint to the job (the time it is frozen) and
//! M the mean time between failures, the interval that loses the least
//! time (frozen time plus work lost at a failure) is, to first order,
//! Young's τ = √(2·C·M); supervise uses Daly's higher-order estimate
//! (J. T. Daly, "A higher order estimate of the optimum checkpoint interval
//! for restart dumps", FGCS 22, 2006):
//!
//! ```text
//! τ = √(2·C·M) · [1 + ⅓·√(C/2M) + (C/2M)/9] − C     for C < 2M
//! τ = M                                             otherwise
//! ```
//!
//! The restart time does not enter τ. The result is then kept at or above
//! `C / max_overhead` (so the job spends at most that fraction of its time
//! frozen) and within `[min, max]`.
//!
//! # C: the median frozen time of the last [`COST_WINDOW`] checkpoints
//!
//! C is what a checkpoint costs the *job*: CRIU's frozen time (the dump's
//! wall time when CRIU reports no statistics); the store's work after the
//! job runs again costs the job nothing. Single dumps on a VM vary a lot
//! (the README's Performance section shows 2-4x outliers from memory the
//! host reclaimed), so the median of the last five is used: one outlier
//! does not move it, while a real change (a job that grew its memory) is
//! followed after three checkpoints.
//!
//! # M: a Bayesian estimate from the operator's `mtbf` and observed failures
//!
//! Failures are taken as a Poisson process with rate λ = 1/M. The prior is
//! a Gamma distribution worth one failure in `mtbf` of run time (shape 1,
//! rate `mtbf`): the operator's estimate counts as much as one observed
//! failure. After the job ran for T (supervised run time, summed over its
//! lives) and failed n times, the posterior mean of λ is (1 + n)/(mtbf + T),
//! and supervise uses
//!
//! ```text
//! M = (mtbf + T) / (1 + n)
//! ```
//!
//! So M starts at `mtbf`, grows while the job runs without failing, drops
//! at each failure, and tends to the observed T/n as failures accumulate:
//! a wrong `mtbf` is corrected by evidence, but one early failure does not
//! make M collapse. Only this job's failures under this supervise count
//! (the history starts afresh when supervise restarts).

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent checkpoints C is the median of.
pub const COST_WINDOW: usize = 5;

/// The operator's settings for `every = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoParams {
    /// The operator's estimate of the mean time between failures.
    pub mtbf: Duration,
    /// Largest fraction of the job's time spent frozen, in parts per
    /// million (`"5%"` is 50 000); `None`: no cap.
    pub max_overhead_ppm: Option<u32>,
    /// Smallest interval.
    pub min: Duration,
    /// Largest interval.
    pub max: Duration,
}

/// Young's first-order optimum, √(2·C·M), in seconds.
pub fn young(c: f64, m: f64) -> f64 {
    (2.0 * c * m).sqrt()
}

/// Daly's higher-order optimum (see the module documentation), in seconds.
pub fn daly(c: f64, m: f64) -> f64 {
    if c >= 2.0 * m {
        return m;
    }
    let r = c / (2.0 * m);
    young(c, m) * (1.0 + r.sqrt() / 3.0 + r / 9.0) - c
}

/// The interval for cost `c` and MTBF `m` (seconds) under `p`'s cap and
/// bounds.
pub fn choose(c: f64, m: f64, p: &AutoParams) -> Duration {
    let mut tau = daly(c.max(0.0), m.max(1e-3));
    if let Some(ppm) = p.max_overhead_ppm.filter(|v| *v > 0) {
        tau = tau.max(c / (f64::from(ppm) / 1e6));
    }
    let tau = tau.clamp(
        p.min.as_secs_f64(),
        p.max.as_secs_f64().max(p.min.as_secs_f64()),
    );
    Duration::try_from_secs_f64(tau).unwrap_or(p.max)
}

/// One job's learned C and M, and the interval they give.
#[derive(Debug, Clone)]
pub struct AutoInterval {
    params: AutoParams,
    costs: VecDeque<f64>,
    failures: u64,
    run_time: f64,
}

impl AutoInterval {
    /// Nothing measured yet: M is `mtbf`, C unknown.
    pub fn new(params: AutoParams) -> AutoInterval {
        AutoInterval {
            params,
            costs: VecDeque::with_capacity(COST_WINDOW),
            failures: 0,
            run_time: 0.0,
        }
    }

    /// A checkpoint froze the job for `frozen`.
    pub fn checkpoint(&mut self, frozen: Duration) {
        if self.costs.len() == COST_WINDOW {
            self.costs.pop_front();
        }
        self.costs.push_back(frozen.as_secs_f64());
    }

    /// The job ran for `d` more (counted towards T).
    pub fn ran(&mut self, d: Duration) {
        self.run_time += d.as_secs_f64();
    }

    /// The job failed (died and is being restored).
    pub fn failure(&mut self) {
        self.failures += 1;
    }

    /// Failures observed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// C in seconds: the median of the recent frozen times; `None` before
    /// the first checkpoint.
    pub fn cost(&self) -> Option<f64> {
        if self.costs.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.costs.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// M in seconds: (mtbf + T) / (1 + n).
    pub fn mtbf(&self) -> f64 {
        (self.params.mtbf.as_secs_f64() + self.run_time) / (1.0 + self.failures as f64)
    }

    /// The interval to use now. Before any checkpoint has been measured it
    /// is `min`, so that C is measured early.
    pub fn interval(&self) -> Duration {
        match self.cost() {
            None => self.params.min,
            Some(c) => choose(c, self.mtbf(), &self.params),
        }
    }
}

/// A stable phase for job `name`: a fraction in [0, 1) of the interval,
/// from a hash of the name (FNV-1a), so that jobs with the same interval
/// tick at different instants, and a job keeps its instant across
/// restarts of supervise.
pub fn phase(name: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Mix the high bits down: FNV's low bits alone are weak for short names.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// True when `new` differs from `old` by more than 20 % of `old`.
pub fn changed_much(old: Duration, new: Duration) -> bool {
    let (o, n) = (old.as_secs_f64(), new.as_secs_f64());
    (n - o).abs() > 0.2 * o
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: f64 = 60.0;
    const HOUR: f64 = 3600.0;

    fn params(mtbf_s: u64) -> AutoParams {
        AutoParams {
            mtbf: Duration::from_secs(mtbf_s),
            max_overhead_ppm: None,
            min: Duration::from_secs(1),
            max: Duration::from_secs(7 * 86400),
        }
    }

    fn minutes(s: f64) -> i64 {
        (s / MIN).round() as i64
    }

    #[test]
    fn young_and_daly_worked_examples() {
        // Daly 2006: C = 5 min (restart 10 min, which does not enter τ).
        let c = 5.0 * MIN;
        assert_eq!(minutes(young(c, 24.0 * HOUR)), 120);
        assert_eq!(minutes(daly(c, 24.0 * HOUR)), 117);
        assert_eq!(minutes(young(c, 6.0 * HOUR)), 60);
        assert_eq!(minutes(daly(c, 6.0 * HOUR)), 57);
        // C >= 2M: checkpoint once per MTBF.
        assert_eq!(daly(10.0, 4.0), 4.0);
        let p = params(24 * 3600);
        assert_eq!(minutes(choose(c, 24.0 * HOUR, &p).as_secs_f64()), 117);
    }

    #[test]
    fn cap_and_bounds() {
        let mut p = params(3600);
        // C = 1 s, M = 1 h: Daly gives ~84 s, i.e. 1.2 % frozen.
        let free = choose(1.0, HOUR, &p).as_secs_f64();
        assert!((83.0..86.0).contains(&free), "{free}");
        // At most 0.5 % frozen: at least 200 s.
        p.max_overhead_ppm = Some(5_000);
        assert_eq!(choose(1.0, HOUR, &p), Duration::from_secs(200));
        p.max = Duration::from_secs(150);
        assert_eq!(choose(1.0, HOUR, &p), Duration::from_secs(150));
        p.max_overhead_ppm = None;
        p.min = Duration::from_secs(100);
        assert_eq!(choose(1.0, HOUR, &p), Duration::from_secs(100));
    }

    #[test]
    fn cost_is_the_median_of_the_last_five() {
        let mut a = AutoInterval::new(params(86400));
        assert_eq!(a.cost(), None);
        assert_eq!(
            a.interval(),
            Duration::from_secs(1),
            "min before C is known"
        );
        for ms in [100, 100, 3000, 100, 100] {
            a.checkpoint(Duration::from_millis(ms));
        }
        assert_eq!(a.cost(), Some(0.1), "one outlier does not move C");
        // The job grew: three larger dumps move the median.
        for _ in 0..3 {
            a.checkpoint(Duration::from_millis(400));
        }
        assert_eq!(a.cost(), Some(0.4));
        a.checkpoint(Duration::from_millis(800));
        a.checkpoint(Duration::from_millis(800));
        assert_eq!(a.cost(), Some(0.4));
        let mut b = AutoInterval::new(params(86400));
        b.checkpoint(Duration::from_millis(100));
        b.checkpoint(Duration::from_millis(300));
        assert_eq!(b.cost(), Some(0.2));
    }

    #[test]
    fn learned_mtbf_moves_with_failures() {
        // The operator guesses 24 h; the job actually fails every 6 h.
        let mut a = AutoInterval::new(params(24 * 3600));
        a.checkpoint(Duration::from_secs(300));
        assert_eq!(a.mtbf(), 24.0 * HOUR);
        assert_eq!(minutes(a.interval().as_secs_f64()), 117);
        let mut last = a.interval();
        for n in 1..=20u64 {
            a.ran(Duration::from_secs(6 * 3600));
            a.failure();
            let i = a.interval();
            assert!(i <= last, "failure {n}: interval must not grow");
            last = i;
            // M = (24 h + n·6 h) / (1 + n)
            let want = (24.0 + n as f64 * 6.0) / (1.0 + n as f64) * HOUR;
            assert!((a.mtbf() - want).abs() < 1e-6);
        }
        assert_eq!(a.failures(), 20);
        // After 20 failures M is within 15 % of the true 6 h, and the
        // interval close to Daly's 57 min for it.
        assert!((a.mtbf() / (6.0 * HOUR) - 1.0).abs() < 0.15, "{}", a.mtbf());
        let m = minutes(a.interval().as_secs_f64());
        assert!((57..=62).contains(&m), "{m}");
        // Running without failures raises M again.
        let before = a.mtbf();
        a.ran(Duration::from_secs(48 * 3600));
        assert!(a.mtbf() > before);
    }

    #[test]
    fn one_early_failure_does_not_collapse_m() {
        let mut a = AutoInterval::new(params(24 * 3600));
        a.ran(Duration::from_secs(60));
        a.failure();
        // Half the prior, not one minute.
        assert!((a.mtbf() - (24.0 * HOUR + 60.0) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn phase_is_stable_and_spread() {
        assert_eq!(phase("job-1"), phase("job-1"));
        let v: Vec<f64> = (0..100).map(|i| phase(&format!("job-{i}"))).collect();
        assert!(v.iter().all(|p| (0.0..1.0).contains(p)));
        // 100 names fall into most of 10 buckets of the interval.
        let mut buckets = [0u32; 10];
        for p in &v {
            buckets[(p * 10.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|b| *b >= 3 && *b <= 20), "{buckets:?}");
    }

    #[test]
    fn twenty_percent() {
        let s = Duration::from_secs;
        assert!(!changed_much(s(100), s(120)));
        assert!(changed_much(s(100), s(121)));
        assert!(changed_much(s(100), s(79)));
    }
}
