//! Inside Slurm: a requeued copy of the job takes the image store's lease
//! (the fence, real files in a temp dir); the old copy sees it within a
//! second, stops its job and publishes nothing more.

use super::*;
use crate::slurm::SlurmContext;

fn slurm(restart: u32) -> SlurmContext {
    SlurmContext {
        job_id: "77".into(),
        node: format!("node{restart}"),
        restart_count: restart,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_copy_takes_over_and_the_old_one_gives_way() {
    let text = job_text(
        "backoff = \"0s\"\nlazy = false\n",
        "[slurm]\nfence_wait = \"10s\"\n",
    );
    let old = start_full(&text, Fake::default(), None, Some(slurm(0))).await;
    old.checkpoint().await;
    let old_fake = old.fake.clone();
    // The same job file (and so the same store) in the requeued run.
    let dir = tempfile::Builder::new().tempdir().unwrap();
    let shared = old.path().to_path_buf();
    std::fs::write(dir.path().join("unused"), "").unwrap();
    let cfg_text = text.clone();
    let new_fake = Arc::new(Fake::default());
    let new = {
        let cfg = JobConfig::from_str_at(&cfg_text, &shared.join("job.toml")).unwrap();
        let (handle, port) = job_channel(&cfg.name, cfg.checkpoint.dir.clone());
        let mut sup = Supervisor::new(cfg, Some(slurm(1)), new_fake.clone()).unwrap();
        sup.connect(port, Metrics::new());
        let (shutdown, rx) = watch::channel(Shutdown::No);
        let task = tokio::spawn(sup.run(rx));
        Harness {
            dir,
            fake: new_fake,
            handle,
            shutdown,
            task,
        }
    };
    // The old copy gives way: its job is stopped, its outcome says why.
    let outcome = tokio::time::timeout(Duration::from_secs(10), old.task)
        .await
        .expect("the old copy gives way")
        .unwrap();
    assert!(matches!(outcome, Outcome::Superseded(_)), "{outcome:?}");
    assert!(!old_fake.job_alive(), "the old copy's job was stopped");
    // The new copy resumes from the old copy's image.
    new.wait(|s| s.state == JobState::Running && s.restores == 1)
        .await;
    assert_eq!(new.fake.restored_from(), vec![(1, false)]);
    assert!(!new.fake.calls().contains(&Call::Launch));
    new.checkpoint().await;
    assert_eq!(new.stop().await, Outcome::Stopped);
}
