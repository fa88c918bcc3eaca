//! How a job starts: attached to a process, re-adopted from an earlier
//! supervise, or resumed from its images.

use super::*;

/// `attach = PID`: supervise attaches to the process (recording its start
/// time), checkpoints it with its tree, and when its root dies kills the
/// tree's survivors (by PID and start time) before restoring the newest
/// image; the attached process is never launched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_checkpoint_kill_survivors_then_restore() {
    let fake = Fake::default();
    *fake.outside.lock().unwrap() = Some((4242, 777));
    let text = job_text("backoff = \"0s\"\nlazy = false\n", "")
        .replace("command = [\"/bin/true\"]", "attach = 4242");
    let h = start_full(&text, fake, None, None).await;
    assert_eq!(h.status().pid, Some(4242));
    let rec = std::fs::read_to_string(h.path().join(".supervise/job/attached.json")).unwrap();
    assert!(rec.contains("777"), "{rec}");
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    h.wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    let calls = h.fake.calls();
    assert_eq!(calls[0], Call::Attach(4242));
    let kill = calls.iter().position(|c| *c == Call::Kill(vec![4242]));
    let restore = calls
        .iter()
        .position(|c| matches!(c, Call::Restore { from: 1, .. }));
    assert!(
        matches!((kill, restore), (Some(k), Some(r)) if k < r),
        "survivors killed before the restore: {calls:?}"
    );
    assert!(!calls.contains(&Call::Launch));
    assert_eq!(h.stop().await, Outcome::Stopped);
}

/// The process to attach to is gone and there is no image: supervision
/// fails with a reason (nothing is launched for an attached job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_a_missing_process_without_images_fails() {
    let text = job_text("", "").replace("command = [\"/bin/true\"]", "attach = 4242");
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(&text, Arc::new(Fake::default()), dir, None);
    match h.task.await.unwrap() {
        Outcome::Failed(r) => assert!(r.contains("4242"), "{r}"),
        o => panic!("{o:?}"),
    }
}

/// An earlier supervise left the job running (job.json names a process
/// that still runs with the same start time): the new one adopts it,
/// neither launching nor restoring a second copy; a job.json whose
/// process is gone is restored from the images instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_job_is_adopted_a_dead_one_restored() {
    let first = start("backoff = \"0s\"\nlazy = false\n").await;
    first.checkpoint().await;
    first.shutdown.send(Shutdown::DetachAll).unwrap();
    assert_eq!(first.task.await.unwrap(), Outcome::Detached);
    let job_json = first.dir.path().join(".supervise/job/job.json");
    let rec: JobRecord = serde_json::from_slice(&std::fs::read(&job_json).unwrap()).unwrap();
    // Adopt: the process still runs.
    let fake = Fake::default();
    *fake.outside.lock().unwrap() = Some((rec.host_pid, rec.start_time));
    let dir = first.dir;
    let text = job_text("backoff = \"0s\"\nlazy = false\n", "");
    let h = start_full(&text, fake, Some(dir), None).await;
    assert_eq!(h.fake.calls(), vec![Call::Adopt(rec.host_pid)]);
    assert_eq!(h.status().pid, Some(rec.host_pid));
    h.shutdown.send(Shutdown::DetachAll).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Detached);
    // Restore: the recorded process is gone.
    let h = start_full(&text, Fake::default(), Some(h.dir), None).await;
    assert_eq!(h.fake.restored_from(), vec![(1, false)]);
    assert!(!h.fake.calls().contains(&Call::Launch));
    assert_eq!(h.stop().await, Outcome::Stopped);
}
