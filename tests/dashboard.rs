//! contrib/grafana/supervise.json against a real supervise: every series a
//! panel (or the `job` variable) queries is exported on /metrics under
//! exactly that name, with the labels the query matches or groups by.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use common::*;
use serde_json::Value;

fn dashboard() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/supervise.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Sample lines of an OpenMetrics text: series name -> the label names seen
/// on its samples. Series without samples (only `# TYPE`) are absent.
fn series(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = l.find(['{', ' ']).unwrap_or(l.len());
        let labels = out.entry(l[..end].to_string()).or_default();
        if l[end..].starts_with('{') {
            let body = &l[end + 1..l[end..].find('}').map(|i| end + i).unwrap_or(l.len())];
            // Label values here are job names and numbers: no `,` or `=`.
            for kv in body.split(',').filter(|kv| !kv.is_empty()) {
                labels.insert(kv.split('=').next().unwrap().trim().to_string());
            }
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
}

/// PromQL tokens that matter here: identifiers and punctuation. String
/// literals, numbers, `[range]`s and Grafana `$variables` are dropped.
fn tokens(expr: &str) -> Vec<Tok> {
    let b: Vec<char> = expr.chars().collect();
    let (mut i, mut out) = (0, Vec::new());
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < b.len() {
        let c = b[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < b.len() && b[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            i += 1;
            while i < b.len() && (ident(b[i]) || b[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let s = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            out.push(Tok::Ident(b[s..i].iter().collect()));
        } else {
            if !c.is_whitespace() {
                out.push(Tok::Punct(c));
            }
            i += 1;
        }
    }
    out
}

/// The identifiers between the `(` at `toks[i]` and its `)` (a `by`
/// list), or between `{` and `}` followed by a matcher operator.
fn labels_in(toks: &[Tok], i: usize, close: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut j = i + 1;
    while j < toks.len() && toks[j] != Tok::Punct(close) {
        if let Tok::Ident(s) = &toks[j] {
            let matcher = close == ')'
                || matches!(
                    toks.get(j + 1),
                    Some(Tok::Punct('=')) | Some(Tok::Punct('!'))
                );
            if matcher {
                out.push(s.clone());
            }
        }
        j += 1;
    }
    out
}

/// What is wrong with one query against the scraped series.
fn check_expr(where_: &str, expr: &str, have: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let toks = tokens(expr);
    let mut bad = Vec::new();
    let names: Vec<&String> = toks
        .iter()
        .filter_map(|t| match t {
            Tok::Ident(s) if s.starts_with("supervise_") => Some(s),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        bad.push(format!("{where_}: no supervise_ series in {expr:?}"));
    }
    for n in &names {
        if !have.contains_key(*n) {
            bad.push(format!(
                "{where_}: series {n} is not on /metrics ({expr:?})"
            ));
        }
    }
    for (i, t) in toks.iter().enumerate() {
        match t {
            // name{label="..."}: the label is on that series.
            Tok::Ident(n)
                if n.starts_with("supervise_") && toks.get(i + 1) == Some(&Tok::Punct('{')) =>
            {
                for l in labels_in(&toks, i + 1, '}') {
                    if have.get(n).is_some_and(|ls| !ls.contains(&l)) {
                        bad.push(format!("{where_}: {n} has no label {l:?}"));
                    }
                }
            }
            // by (...) / without (...): on every series of the query.
            Tok::Ident(k) if k == "by" || k == "without" => {
                assert_eq!(toks.get(i + 1), Some(&Tok::Punct('(')), "{expr}");
                for l in labels_in(&toks, i + 1, ')') {
                    for n in &names {
                        if have.get(*n).is_some_and(|ls| !ls.contains(&l)) {
                            bad.push(format!("{where_}: {n} has no label {l:?} (by)"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    bad
}

/// Every panel (rows' nested panels too).
fn panels(v: &Value, out: &mut Vec<Value>) {
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p.clone());
        panels(p, out);
    }
}

/// Everything wrong with `dash` against the scraped series.
fn problems(dash: &Value, have: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut all = Vec::new();
    panels(dash, &mut all);
    let mut n_targets = 0;
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            n_targets += 1;
            let expr = t["expr"].as_str().unwrap_or("");
            bad.extend(check_expr(&format!("panel {title:?}"), expr, have));
        }
    }
    if n_targets == 0 {
        bad.push("no panel targets".into());
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        // label_values(series, label): the label is on the series.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q:?}"));
        let (s, l) = inner.rsplit_once(',').unwrap();
        let (s, l) = (s.trim(), l.trim());
        let expr = format!("sum by ({l}) ({s})");
        bad.extend(check_expr(&format!("variable {}", v["name"]), &expr, have));
    }
    bad
}

/// The dashboard's own shape: importable (a DS_PROMETHEUS input used by
/// every query), a `job` variable used by every query, unique panel ids.
#[test]
fn dashboard_is_importable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let inputs = d["__inputs"].as_array().unwrap();
    assert!(inputs
        .iter()
        .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"));
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["name"] == "job"), "a job variable");
    let mut all = Vec::new();
    panels(&d, &mut all);
    let mut ids = BTreeSet::new();
    for p in &all {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id {p}");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            let e = t["expr"].as_str().unwrap();
            assert!(e.contains(r#"job=~"$job""#), "{}: {e}", p["title"]);
        }
    }
    // The checker itself: identifiers, strings, ranges and variables.
    assert_eq!(
        tokens(r#"sum by (job) (rate(a_b{job=~"$x",o!="y"}[$__rate_interval])) / 1.5"#),
        [
            "sum", "by", "(", "job", ")", "(", "rate", "(", "a_b", "{", "job", "=", "~", ",", "o",
            "!", "=", "}", ")", ")", "/"
        ]
        .iter()
        .map(|s| match s.chars().next().unwrap() {
            c if s.len() == 1 && !c.is_ascii_alphabetic() => Tok::Punct(c),
            _ => Tok::Ident(s.to_string()),
        })
        .collect::<Vec<_>>()
    );
}

/// A fresh supervise, before its job's first checkpoint or restore,
/// already exports every series the dashboard queries (at zero), so no
/// panel shows "No data" until a job has died once.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn a_fresh_supervise_exports_every_series_the_dashboard_queries() {
    let env = Env::new();
    let job = JobFile::counter("fresh").every("1h").write(&env);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sup = env.start_with(&[OsStr::new("--metrics"), OsStr::new(&addr), job.as_os_str()]);
    sup.wait_state("fresh", "running", T);
    sup.wait_for("metrics listener ready", 1, T);
    let s = sup.job_status("fresh");
    assert_eq!(s["checkpoints"], 0);
    assert_eq!(s["restores"], 0);
    let text = scrape(port);
    let bad = problems(&dashboard(), &series(&text));
    assert!(
        bad.is_empty(),
        "a fresh supervise lacks series the dashboard queries:\n{}\n/metrics:\n{text}",
        bad.join("\n")
    );
    assert!(text.contains(r#"supervise_restores_total{job="fresh",outcome="failed"} 0"#));
}

/// Every series and label the dashboard queries is on a real supervise's
/// /metrics once the job has been checkpointed and restored; a misspelt
/// series or label is caught.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn dashboard_queries_only_exported_series() {
    let t0 = Instant::now();
    let env = Env::new();
    let job = JobFile::counter("d").every("1s").write(&env);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sup = env.start_with(&[OsStr::new("--metrics"), OsStr::new(&addr), job.as_os_str()]);
    sup.wait_checkpoints("d", 1, T);
    sup.kill_job("d");
    sup.wait_restores("d", 1, T);
    let text = scrape(port);
    let have = series(&text);

    let dash = dashboard();
    let bad = problems(&dash, &have);
    assert!(
        bad.is_empty(),
        "dashboard queries what supervise does not export:\n{}\n/metrics:\n{text}",
        bad.join("\n")
    );

    // The check catches a misspelt series and a label that is not there.
    let raw = serde_json::to_string(&dash).unwrap();
    for (from, to) in [
        (
            "supervise_checkpoint_frozen_seconds_bucket",
            "supervise_checkpoint_frozen_second_bucket",
        ),
        ("supervise_checkpoints_total", "supervise_checkpoints"),
        ("by (job, outcome)", "by (job, result)"),
        (r#"supervise_job_up{job"#, r#"supervise_job_up{name"#),
    ] {
        assert!(raw.contains(&from.replace('"', "\\\"")), "{from}");
        let mutated: Value =
            serde_json::from_str(&raw.replace(&from.replace('"', "\\\""), to)).unwrap();
        assert!(
            !problems(&mutated, &have).is_empty(),
            "{from} -> {to} not caught"
        );
    }
    eprintln!(
        "dashboard: {} series checked in {:.1?}",
        have.len(),
        t0.elapsed()
    );
}
