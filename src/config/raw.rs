//! The job file as written: serde types that mirror the TOML schema, and the
//! wrapper types that validate leaf values while deserializing (so that errors
//! carry the value's span and key path).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::bounds;
use super::{
    NetworkLock, RestoreOn, ShutdownAction, SlurmSignal, MAX_CRIU_LOG_LEVEL, MAX_NAME_LEN,
};
use crate::criu::{parse_size, pass_through_field, OptKind, OptValue};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    pub(super) name: Option<JobName>,
    pub(super) command: Option<Spanned<Argv>>,
    pub(super) attach: Option<Spanned<Pid>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) cwd: Option<Spanned<PathValue>>,
    pub(super) env: Option<EnvMap>,
    pub(super) stdout: Option<Spanned<PathValue>>,
    pub(super) stderr: Option<Spanned<PathValue>>,
    pub(super) state_dir: Option<PathValue>,
    pub(super) private_tmp: Option<bool>,
    pub(super) checkpoint: Option<Table<RawCheckpoint>>,
    pub(super) restore: Option<Table<RawRestore>>,
    pub(super) shutdown: Option<Table<RawShutdown>>,
    pub(super) files: Option<Table<RawFiles>>,
    pub(super) slurm: Option<Table<RawSlurm>>,
    pub(super) store: Option<Table<RawStore>>,
}

/// A sub-table. Unlike a plain derived struct it refuses arrays (serde would
/// otherwise accept `[[checkpoint]]` as a struct written as a sequence).
pub(super) struct Table<T>(pub(super) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Table<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoint {
    pub(super) every: Option<Spanned<Every>>,
    pub(super) mtbf: Option<Spanned<IntervalDur>>,
    pub(super) max_overhead: Option<Spanned<Percent>>,
    pub(super) min: Option<Spanned<IntervalDur>>,
    pub(super) max: Option<Spanned<IntervalDur>>,
    pub(super) cron: Option<Spanned<CronExpr>>,
    pub(super) timezone: Option<Spanned<TzName>>,
    pub(super) dir: Option<PathValue>,
    pub(super) keep: Option<Count<1, { bounds::KEEP }>>,
    pub(super) shell_job: Option<bool>,
    pub(super) tcp_established: Option<bool>,
    pub(super) file_locks: Option<bool>,
    pub(super) ext_unix_sk: Option<bool>,
    pub(super) log_level: Option<Count<0, { MAX_CRIU_LOG_LEVEL as u64 }>>,
    pub(super) network_lock: Option<NetworkLock>,
    pub(super) timeout: Option<Dur<1, { bounds::CHECKPOINT_TIMEOUT.as_secs() }>>,
    pub(super) ghost_limit: Option<Size<{ u32::MAX as u64 }>>,
    pub(super) skip_in_flight: Option<bool>,
    pub(super) link_remap: Option<bool>,
    pub(super) tcp_close: Option<bool>,
    pub(super) criu_opts: Option<Table<CriuOptsTable>>,
    pub(super) stream: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestore {
    pub(super) on: Option<RestoreOn>,
    pub(super) max_restores: Option<Count<1, { bounds::MAX_RESTORES }>>,
    pub(super) window: Option<Dur<1, { bounds::RESTORE_WINDOW.as_secs() }>>,
    pub(super) backoff: Option<Spanned<BackoffDur>>,
    pub(super) backoff_max: Option<Spanned<BackoffDur>>,
    pub(super) healthy_after: Option<BackoffDur>,
    pub(super) lazy: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) action: Option<ShutdownAction>,
    pub(super) checkpoint: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlurm {
    pub(super) signal: Option<SlurmSignal>,
    pub(super) requeue: Option<bool>,
    pub(super) fence_wait: Option<Dur<0, { bounds::FENCE_WAIT.as_secs() }>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) encryption: Option<bool>,
    pub(super) key_file: Option<PathValue>,
    pub(super) parity: Option<bool>,
    pub(super) copies: Option<Spanned<Count<1, 2>>>,
    pub(super) copy_dir: Option<Spanned<PathValue>>,
    pub(super) scrub: Option<Dur<1, { bounds::SCRUB.as_secs() }>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFiles {
    pub(super) rollback: Option<bool>,
    pub(super) watch: Option<bool>,
    pub(super) snapshot: Option<Vec<Spanned<PathValue>>>,
    pub(super) append: Option<Vec<Spanned<PathValue>>>,
    pub(super) exclude: Option<Vec<Spanned<PathValue>>>,
}

/// `Deserialize` for the job file's choice enums (`crate::choice`): one of
/// the spellings in their `ALL`.
macro_rules! choice_deserialize {
    ($($name:ident),+) => {$(
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_choice(d, $name::ALL)
            }
        }
    )+};
}

choice_deserialize!(NetworkLock, SlurmSignal, RestoreOn, ShutdownAction);

fn de_choice<'de, D, T>(d: D, all: &'static [(T, &'static str)]) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Copy,
{
    de_str(d, "a string", |s| {
        all.iter()
            .find(|(_, text)| *text == s)
            .map(|(v, _)| *v)
            .ok_or_else(|| {
                let names: Vec<String> = all.iter().map(|(_, t)| format!("\"{t}\"")).collect();
                format!(
                    "invalid value {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    })
}

/// Deserializes a string through `f`; `f`'s error becomes the message.
fn de_str<'de, D, T, F>(d: D, expecting: &'static str, f: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct V<T, F>(&'static str, F, PhantomData<T>);
    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for V<T, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(expecting, f, PhantomData))
}

/// Deserializes an integer through `f`; `f`'s error becomes the message.
fn de_int<'de, D, T, F>(d: D, expecting: &'static str, f: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(i128) -> Result<T, String>,
{
    struct V<T, F>(&'static str, F, PhantomData<T>);
    impl<T, F: FnOnce(i128) -> Result<T, String>> Visitor<'_> for V<T, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            (self.1)(i128::from(v)).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.1)(i128::from(v)).map_err(E::custom)
        }
    }
    d.deserialize_i64(V(expecting, f, PhantomData))
}

pub(super) fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub(super) const NAME_RULE: &str =
    "only letters A-Z a-z, digits 0-9 and `.`, `_`, `-` are allowed, \
                         at most 128 of them, and it must not be empty, `.` or `..`";

pub(super) struct JobName(pub(super) String);

impl<'de> Deserialize<'de> for JobName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a job name string", |s| {
            if is_valid_name(s) {
                Ok(JobName(s.to_string()))
            } else if s.is_empty() {
                Err("must not be empty".to_string())
            } else if s.len() > MAX_NAME_LEN {
                Err(format!(
                    "job name is {} bytes long; the limit is {MAX_NAME_LEN} (it becomes a \
                     directory name)",
                    s.len()
                ))
            } else {
                Err(format!("invalid job name {s:?}: {NAME_RULE}"))
            }
        })
    }
}

pub(super) struct Argv(pub(super) Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut argv = Vec::new();
                while let Some(ArgString(arg)) = seq.next_element()? {
                    argv.push(arg);
                }
                match argv.first() {
                    None => Err(de::Error::custom(
                        "must not be empty (give at least the program to run)",
                    )),
                    Some(p) if p.is_empty() => Err(de::Error::custom(
                        "the program (first element) must not be an empty string",
                    )),
                    Some(_) => Ok(Argv(argv)),
                }
            }
        }
        d.deserialize_seq(V)
    }
}

pub(super) struct ArgString(pub(super) String);

impl<'de> Deserialize<'de> for ArgString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a string", |s| {
            if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(ArgString(s.to_string()))
            }
        })
    }
}

pub(super) struct Pid(pub(super) i32);

impl<'de> Deserialize<'de> for Pid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_int(
            d,
            "a process id (a positive integer)",
            |v| match i32::try_from(v) {
                Ok(pid) if pid > 0 => Ok(Pid(pid)),
                _ => Err(format!(
                    "invalid process id {v}: must be between 1 and {}",
                    i32::MAX
                )),
            },
        )
    }
}

pub(super) struct PathValue(pub(super) PathBuf);

impl<'de> Deserialize<'de> for PathValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a path string", |s| {
            if s.is_empty() {
                Err("must not be empty (use \".\" for the job file's directory)".to_string())
            } else if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(PathValue(PathBuf::from(s)))
            }
        })
    }
}

/// `env`: string keys and values; remembers the span of the first value so
/// that "env with attach" can point somewhere even for `[env]` tables.
pub(super) struct EnvMap {
    pub(super) vars: BTreeMap<String, String>,
    pub(super) first_span: Option<std::ops::Range<usize>>,
}

impl<'de> Deserialize<'de> for EnvMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = EnvMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of environment variables")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EnvMap, A::Error> {
                let mut env = EnvMap {
                    vars: BTreeMap::new(),
                    first_span: None,
                };
                while let Some(EnvName(k)) = map.next_key()? {
                    let v: Spanned<EnvValue> = map.next_value()?;
                    if env.first_span.is_none() {
                        env.first_span = Some(v.span());
                    }
                    env.vars.insert(k, v.into_inner().0);
                }
                Ok(env)
            }
        }
        d.deserialize_map(V)
    }
}

pub(super) struct EnvName(pub(super) String);

impl<'de> Deserialize<'de> for EnvName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "an environment variable name", |s| {
            if s.is_empty() || s.contains(['=', '\0']) {
                Err(format!(
                    "invalid environment variable name {s:?}: must be non-empty without `=` or NUL"
                ))
            } else {
                Ok(EnvName(s.to_string()))
            }
        })
    }
}

pub(super) struct EnvValue(pub(super) String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a string (quote numbers, e.g. \"8080\")", |s| {
            if s.contains('\0') {
                Err("must not contain a NUL character".to_string())
            } else {
                Ok(EnvValue(s.to_string()))
            }
        })
    }
}

/// A humantime duration of at least `MIN_SECS` and at most `MAX_SECS`
/// seconds.
pub(super) struct Dur<const MIN_SECS: u64, const MAX_SECS: u64>(pub(super) Duration);

/// `checkpoint.mtbf`, `min` and `max`.
pub(super) type IntervalDur = Dur<1, { bounds::INTERVAL.as_secs() }>;
/// `restore.backoff`, `backoff_max` and `healthy_after`.
pub(super) type BackoffDur = Dur<0, { bounds::BACKOFF.as_secs() }>;

/// "must be at most 1day (found "500000000y")" when `v` exceeds `max`.
pub(super) fn check_max(v: Duration, max: Duration, s: &str) -> Result<(), String> {
    if v > max {
        return Err(format!(
            "must be at most {} (found {s:?})",
            humantime::format_duration(max)
        ));
    }
    Ok(())
}

impl<'de, const MIN_SECS: u64, const MAX_SECS: u64> Deserialize<'de> for Dur<MIN_SECS, MAX_SECS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(
            d,
            "a duration string such as \"30s\", \"5m\" or \"1h 30m\"",
            |s| {
                let v = humantime::parse_duration(s)
                    .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
                if v < Duration::from_secs(MIN_SECS) {
                    return Err(format!("must be at least {MIN_SECS}s (found {s:?})"));
                }
                check_max(v, Duration::from_secs(MAX_SECS), s)?;
                Ok(Dur(v))
            },
        )
    }
}

/// `checkpoint.every`: a duration of at least 1 s and at most a year, or
/// `"auto"`.
pub(super) enum Every {
    /// A fixed interval.
    Fixed(Duration),
    /// supervise picks the interval (`crate::interval`).
    Auto,
}

impl<'de> Deserialize<'de> for Every {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(
            d,
            "a duration string such as \"30s\", \"5m\" or \"1h 30m\", or \"auto\"",
            |s| {
                if s == "auto" {
                    return Ok(Every::Auto);
                }
                let v = humantime::parse_duration(s).map_err(|e| {
                    format!("invalid duration {s:?}: {e} (or \"auto\" to let supervise choose)")
                })?;
                if v < Duration::from_secs(1) {
                    return Err(format!("must be at least 1s (found {s:?})"));
                }
                check_max(v, bounds::INTERVAL, s)?;
                Ok(Every::Fixed(v))
            },
        )
    }
}

/// A percentage in (0, 100], written `"5%"` or `"0.5%"`; kept in parts per
/// million.
pub(super) struct Percent(pub(super) u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a percentage string such as \"5%\"", |s| {
            let bad = || format!("invalid percentage {s:?}: expected e.g. \"5%\" or \"0.5%\"");
            let num = s.trim().strip_suffix('%').ok_or_else(bad)?;
            let v: f64 = num.trim().parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!(
                    "must be more than 0% and at most 100% (found {s:?})"
                ));
            }
            Ok(Percent(((v * 10_000.0).round() as u32).max(1)))
        })
    }
}

/// An integer in `MIN..=MAX`.
pub(super) struct Count<const MIN: u64, const MAX: u64>(pub(super) u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Count<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_int(d, "an integer", |v| match u64::try_from(v) {
            Ok(n) if (MIN..=MAX).contains(&n) => Ok(Count(n)),
            _ if MAX >= u64::from(u32::MAX) && v < i128::from(MIN) => {
                Err(format!("must be at least {MIN} (found {v})"))
            }
            _ if MAX >= u64::from(u32::MAX) => Err(format!("must be at most {MAX} (found {v})")),
            _ => Err(format!("must be between {MIN} and {MAX} (found {v})")),
        })
    }
}

pub(super) struct CronExpr {
    pub(super) expr: String,
    pub(super) schedule: cron::Schedule,
}

const CRON_FIELDS: &str = "sec min hour day-of-month month day-of-week [year]";

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a cron expression string", |s| {
            let fields = s.split_whitespace().count();
            let shorthand = s.trim_start().starts_with('@');
            match s.parse::<cron::Schedule>() {
                Ok(schedule) => Ok(CronExpr {
                    expr: s.to_string(),
                    schedule,
                }),
                Err(_) if !shorthand && !(6..=7).contains(&fields) => Err(format!(
                    "invalid cron expression {s:?}: expected 6 or 7 fields ({CRON_FIELDS}), \
                     found {fields}"
                )),
                Err(e) => Err(format!(
                    "invalid cron expression {s:?}: {}",
                    cron_error_text(s, &e.to_string())
                )),
            }
        })
    }
}

/// The cron crate renders errors as "EXPR\n   ^\nreason"; keep the reason.
fn cron_error_text(expr: &str, msg: &str) -> String {
    let reason: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != expr.trim() && !l.chars().all(|c| c == '^'))
        .collect();
    if reason.is_empty() {
        format!("not a valid expression (expected 6 or 7 fields: {CRON_FIELDS}, or @yearly, @monthly, @weekly, @daily, @hourly)")
    } else {
        reason.join("; ")
    }
}

pub(super) struct TzName(pub(super) chrono_tz::Tz);

impl<'de> Deserialize<'de> for TzName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "an IANA time zone name string", |s| {
            if let Ok(tz) = s.parse::<chrono_tz::Tz>() {
                return Ok(TzName(tz));
            }
            let mut msg =
                format!("unknown time zone {s:?} (expected an IANA name such as \"Europe/Berlin\" or \"UTC\")");
            if let Some(tz) = chrono_tz::TZ_VARIANTS
                .iter()
                .find(|tz| tz.name().eq_ignore_ascii_case(s))
            {
                msg.push_str(&format!("; did you mean \"{}\"?", tz.name()));
            }
            Err(msg)
        })
    }
}

/// A size in bytes up to `MAX`: an integer (bytes) or a string with a unit
/// (`crate::criu::parse_size`).
pub(super) struct Size<const MAX: u64>(pub(super) u64);

impl<'de, const MAX: u64> Deserialize<'de> for Size<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MAX: u64>;
        fn check<const MAX: u64, E: de::Error>(n: u64, shown: &str) -> Result<Size<MAX>, E> {
            if n > MAX {
                Err(E::custom(format!(
                    "size {shown} is too large: at most {MAX} bytes (CRIU takes a 32-bit value)"
                )))
            } else {
                Ok(Size(n))
            }
        }
        impl<const MAX: u64> Visitor<'_> for V<MAX> {
            type Value = Size<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"8MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size<MAX>, E> {
                let n = parse_size(s).map_err(E::custom)?;
                check(n, &format!("{s:?}"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size<MAX>, E> {
                match u64::try_from(v) {
                    Ok(n) => check(n, &v.to_string()),
                    Err(_) => Err(E::custom(format!("must not be negative (found {v})"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size<MAX>, E> {
                check(v, &v.to_string())
            }
        }
        d.deserialize_any(V::<MAX>)
    }
}

/// `[checkpoint.criu_opts]`: rpc.proto `criu_opts` fields by name, each
/// checked against `crate::criu::PASS_THROUGH` (unknown, refused and
/// unsupported names are errors at the key) and its value against the
/// field's type (errors at the value).
pub(super) struct CriuOptsTable(pub(super) BTreeMap<String, OptValue>);

impl<'de> Deserialize<'de> for CriuOptsTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CriuOptsTable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of CRIU options")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CriuOptsTable, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(OptName(name, kind)) = map.next_key()? {
                    let v = map.next_value_seed(KindSeed(kind))?;
                    out.insert(name.to_string(), v);
                }
                Ok(CriuOptsTable(out))
            }
        }
        d.deserialize_map(V)
    }
}

struct OptName(&'static str, OptKind);

impl<'de> Deserialize<'de> for OptName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, "a CRIU option name", |s| {
            pass_through_field(s).map(|f| OptName(f.name, f.kind))
        })
    }
}

struct KindSeed(OptKind);

impl<'de> de::DeserializeSeed<'de> for KindSeed {
    type Value = OptValue;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<OptValue, D::Error> {
        let kind = self.0;
        match kind {
            OptKind::Bool => bool::deserialize(d).map(OptValue::Bool),
            OptKind::Int32 | OptKind::Uint32 => de_int(d, kind.expecting(), |v| {
                let (lo, hi) = kind.range().unwrap_or((i64::MIN, i64::MAX));
                match i64::try_from(v) {
                    Ok(n) if (lo..=hi).contains(&n) => Ok(OptValue::Int(n)),
                    _ => Err(format!("must be between {lo} and {hi} (found {v})")),
                }
            }),
            OptKind::Str => ArgString::deserialize(d).map(|s| OptValue::Str(s.0)),
            OptKind::StrList => Vec::<ArgString>::deserialize(d)
                .map(|l| OptValue::List(l.into_iter().map(|s| s.0).collect())),
        }
    }
}
