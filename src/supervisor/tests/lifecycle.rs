//! Crash loops, manual restores, shutdown and detach.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_restores_with_backoff_then_gives_up() {
    let h = start("max_restores = 2\nbackoff = \"10ms\"\nbackoff_max = \"1s\"\n").await;
    h.checkpoint().await;
    for n in 1..=2 {
        h.fake.die(ExitStatus::Signal(libc::SIGKILL));
        h.wait(|s| s.restores == n && s.state == JobState::Running)
            .await;
    }
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let outcome = h.task.await.unwrap();
    match outcome {
        Outcome::Failed(r) => assert!(r.contains("job died 3 times"), "{r}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(h.fake.counts(), (1, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_restores_are_not_counted_and_start_resets() {
    let h = start("max_restores = 1\nbackoff = \"0s\"\n").await;
    h.checkpoint().await;
    // Manual restores do not count against max_restores.
    for _ in 0..3 {
        let r = h.ask(|tx| Command::Restore(None, tx)).await;
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
    }
    // One automatic restore is allowed...
    h.fake.die(ExitStatus::Code(3));
    h.wait(|s| s.restores == 4 && s.state == JobState::Running)
        .await;
    // ...stop and start reset the count...
    let r = h.ask(|tx| Command::Stop(false, tx)).await;
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    h.wait(|s| s.state == JobState::Stopped).await;
    let r = h.ask(Command::Checkpoint).await;
    assert!(matches!(r, Response::Error { ref message } if message.contains("stopped")));
    let r = h.ask(Command::Start).await;
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    h.wait(|s| s.state == JobState::Running).await;
    h.fake.die(ExitStatus::Code(3));
    h.wait(|s| s.restores == 6 && s.state == JobState::Running)
        .await;
    // ...so only the second death after the start gives up.
    h.fake.die(ExitStatus::Code(3));
    assert!(matches!(h.task.await.unwrap(), Outcome::Failed(_)));
    // One launch; restores: 3 manual, 1 automatic, 1 by start, 1 automatic.
    assert_eq!(h.fake.counts(), (1, 1, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_exit_completes_and_shutdown_checkpoints_then_stops() {
    let h = start("").await;
    h.fake.die(ExitStatus::Code(0));
    assert!(matches!(h.task.await.unwrap(), Outcome::Completed(_)));
    let h = start("").await;
    let fake = h.fake.clone();
    assert_eq!(h.stop().await, Outcome::Stopped);
    // The final checkpoint was taken, and the job killed.
    assert_eq!(fake.counts(), (1, 1, 0));
    assert!(!fake.job_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_all_leaves_the_job_running_without_a_checkpoint() {
    let h = start("").await;
    h.shutdown.send(Shutdown::DetachAll).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Detached);
    // No checkpoint, no kill: one launch and nothing else.
    assert_eq!(h.fake.counts(), (1, 0, 0));
    assert!(h.fake.job_alive());
    // job.json stays for the next supervise to re-adopt.
    assert!(h.dir.path().join(".supervise/job/job.json").exists());
}

/// A restore that fails for want of a descriptor of supervise's (EMFILE)
/// says nothing about the image: the same, newest image is tried again
/// after a pause; no older image is tried and the command is not started
/// afresh (either would lose the job's work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_short_of_descriptors_retries_the_newest_image() {
    let fake = Fake::default();
    fake.faults.lock().unwrap().restore_emfile = 2;
    let h = start_with("lazy = false\nbackoff = \"0s\"\n", fake).await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    h.wait(|s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("retrying") && e.contains("Too many open files"))
    })
    .await;
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(
        s.last_restore.unwrap().checkpoint,
        s.last_checkpoint.unwrap().id
    );
    // Three tries, all of the newest dump; one launch (the first start).
    assert_eq!(
        h.fake.restored_from(),
        vec![(2, false), (2, false), (2, false)]
    );
    assert_eq!(h.fake.counts(), (1, 2, 1));
    assert_eq!(s.failed_restores, 2);
    let f = s.last_failure.unwrap();
    assert_eq!(
        (f.operation.as_str(), f.step.as_str(), f.resource),
        ("restore", "criu-restore", true)
    );
    assert_eq!(h.stop().await, Outcome::Stopped);
}
