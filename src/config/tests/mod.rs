//! Unit tests of job-file parsing and validation, by topic (one module
//! each); the helpers here are shared by all of them.

use std::path::Path;

use super::*;

mod criu;
mod diagnostics;
mod job;
mod reference;
mod schedule;
mod tables;
mod upper_bounds;

const FILE: &str = "/x/job.toml";

fn parse(text: &str) -> Result<JobConfig, ConfigError> {
    JobConfig::from_str_at(text, Path::new(FILE))
}

fn ok(text: &str) -> JobConfig {
    parse(text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
}

/// Asserts an `Invalid` error at `line:col` for `key`, whose message
/// contains `needle`; returns the full display string.
#[track_caller]
fn invalid(text: &str, line: usize, column: usize, key: &str, needle: &str) -> String {
    let e = parse(text).expect_err("expected an error");
    let shown = e.to_string();
    assert!(
        matches!(e, ConfigError::Invalid { .. }),
        "not Invalid: {shown}"
    );
    assert_eq!(e.position(), Some(Position { line, column }), "{shown}");
    assert_eq!(e.key(), Some(key), "{shown}");
    let prefix = format!("{FILE}:{line}:{column}: {key}: ");
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} lacks prefix {prefix:?}"
    );
    assert!(shown.contains(needle), "{shown:?} lacks {needle:?}");
    shown
}

/// The byte offset of the first occurrence of `needle` in `text`,
/// as a position — used to check that positions point at the right spot.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let p = Position::of_offset(text, text.find(needle).expect("needle"));
    (p.line, p.column)
}

const REFERENCE: &str = include_str!("../../../config/reference.toml");
