//! Steps that fail, and what the loop does with each kind: a checkpoint
//! step (the job keeps running; status says which step), a restore step
//! of one image (the next older image), the lazy part of a restore (the
//! same image eagerly), CRIU refusing an image (the next older one, no
//! eager retry). With rollback on.

use super::*;

fn rollback_on(restore: &str) -> String {
    job_text(restore, "[files]\nrollback = true\n")
}

/// Recording the job's files at post-dump fails: the checkpoint fails at
/// its "capture" step, the job keeps running, status counts it; the next
/// checkpoint records the files (in its manifest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_failure_fails_the_checkpoint_not_the_job() {
    let fake = Fake::default();
    fake.faults.lock().unwrap().capture = 1;
    let text = rollback_on("");
    let h = start_full(&text, fake, None, None).await;
    let r = h.ask(Command::Checkpoint).await;
    assert!(
        matches!(&r, Response::Error { message } if message.contains("capture")),
        "{r:?}"
    );
    let s = h.status();
    assert_eq!((s.failed_checkpoints, s.checkpoints), (1, 0));
    let f = s.last_failure.unwrap();
    assert_eq!(
        (f.operation.as_str(), f.step.as_str()),
        ("checkpoint", "capture")
    );
    assert!(f.checkpoint.is_some());
    assert!(h.fake.job_alive());
    h.checkpoint().await;
    let cfg = JobConfig::from_str_at(&text, &h.path().join("job.toml")).unwrap();
    let store = ImageStore::open_with(&cfg.checkpoint.dir, &cfg.store).unwrap();
    let images = store.list().unwrap();
    assert_eq!(images.len(), 1, "the failed checkpoint left nothing");
    assert_eq!(images[0].manifest.meta.extra.files, Some(1));
    assert!(h.fake.calls().iter().all(|c| !matches!(
        c,
        Call::Dump {
            rollback: false,
            ..
        }
    )));
    assert_eq!(h.stop().await, Outcome::Stopped);
}

/// CRIU's dump fails: step "dump", the job keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_failure_is_counted_with_its_step() {
    let fake = Fake::default();
    fake.faults.lock().unwrap().dump = 2;
    let h = start_with("", fake).await;
    for _ in 0..2 {
        let r = h.ask(Command::Checkpoint).await;
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
    }
    let s = h.status();
    assert_eq!(s.failed_checkpoints, 2);
    assert_eq!(s.last_failure.unwrap().step, "dump");
    h.checkpoint().await;
    assert_eq!(h.status().checkpoints, 1);
    assert_eq!(h.stop().await, Outcome::Stopped);
}

/// The rollback refuses the newest image: the next older one is restored
/// (rollback on throughout), and status names the "rollback" step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rollback_falls_back_to_the_older_image() {
    let fake = Fake::default();
    let h = start_full(
        &rollback_on("backoff = \"0s\"\nlazy = false\n"),
        fake,
        None,
        None,
    )
    .await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.faults.lock().unwrap().rollback = 1;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(h.fake.restored_from(), vec![(2, false), (1, false)]);
    assert!(h.fake.calls().iter().all(|c| !matches!(
        c,
        Call::Restore {
            rollback: false,
            ..
        }
    )));
    assert_eq!(s.failed_restores, 1);
    assert_eq!(s.last_failure.unwrap().step, "rollback");
    assert_eq!(h.stop().await, Outcome::Stopped);
}

/// The lazy part of a lazy restore fails: the same image is restored
/// eagerly. CRIU refusing an image in a lazy restore is not a lazy
/// failure: the next older image is tried (lazily), not the same one
/// eagerly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_lazy_failure_is_retried_eagerly() {
    let fake = Fake {
        lazy: true,
        ..Default::default()
    };
    let h = start_with("backoff = \"0s\"\n", fake).await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.faults.lock().unwrap().lazy_part = 1;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(h.fake.restored_from(), vec![(2, true), (2, false)]);
    assert_eq!(s.last_restore.unwrap().mode, "eager");
    assert_eq!(s.last_failure.unwrap().step, "lazy");
    h.fake.faults.lock().unwrap().restore_refused = 1;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 2 && s.state == JobState::Running)
        .await;
    assert_eq!(
        h.fake.restored_from()[2..],
        [(2, true), (1, true)],
        "no eager retry of a refused image"
    );
    assert_eq!(s.last_failure.unwrap().step, "criu-restore");
    assert_eq!(s.failed_restores, 2);
    assert_eq!(h.stop().await, Outcome::Stopped);
}

/// Streamed checkpoints and lazy restores through the real store: each
/// dump's pages reach the store through the page sink; a lazy restore
/// writes out only the eager page and reads every lazy page, verified,
/// from the store, of the newest checkpoint; `lazy = false` restores
/// eagerly (every page written out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_checkpoints_restore_lazily_from_the_store() {
    let fake = Fake {
        lazy: true,
        ..Default::default()
    };
    let h = start_with("backoff = \"0s\"\n", fake).await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    let r = s.last_restore.expect("restore shown");
    assert_eq!(r.mode, "lazy");
    // The store's first checkpoint is written out by CRIU, later ones are
    // streamed.
    let streamed: Vec<bool> = h
        .fake
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Dump { streamed, .. } => Some(*streamed),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, vec![false, true]);
    assert_eq!(
        *h.fake.lazy_reads.lock().unwrap(),
        vec![0x10000, 0x11000, 0x20000]
    );
    assert_eq!(h.stop().await, Outcome::Stopped);

    let h = start_with(
        "lazy = false\nbackoff = \"0s\"\n",
        Fake {
            lazy: true,
            ..Default::default()
        },
    )
    .await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(s.last_restore.unwrap().mode, "eager");
    assert!(h.fake.lazy_reads.lock().unwrap().is_empty());
    assert_eq!(h.stop().await, Outcome::Stopped);
}
