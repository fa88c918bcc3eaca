//! The image store next to a hostile user (uid 65534): a planted image
//! directory, predictable scratch names on `/dev/shm`, FIFOs and symlinks
//! in place of store files, a foreign directory as the store, and a user
//! who may not read root's store.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Env, JobFile, T};
use crate::{as_nobody, attacker_dir, chown, nobody, open_up, NOBODY};

/// Upper bound for any store command on a hostile store.
const BOUND: Duration = Duration::from_secs(20);

/// A counter job checkpointed every second into `dir`.
fn counter_job(env: &Env, name: &str, dir: &str) -> PathBuf {
    JobFile::counter(name).dir(dir).keep(3).write(env)
}

/// What a bounded run of the CLI did.
struct Ran {
    /// Exit code; `None` if it had to be killed after [`BOUND`] or died by
    /// a signal (e.g. an allocation failure).
    code: Option<i32>,
    out: String,
    took: Duration,
}

/// Runs `supervise ARGS JOB` (as `uid`, through setpriv, if given) with at
/// most 2 GiB of address space, killing it after [`BOUND`].
fn run_bounded(env: &Env, args: &[&str], job: &Path, uid: Option<u32>) -> Ran {
    let out_path = env.path().join(format!(
        "cli-{}.out",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let out = fs::File::create(&out_path).unwrap();
    let mut cmd = match uid {
        Some(u) => {
            // The binary where the attacker can execute it.
            let bin = env.path().join("supervise-bin");
            if !bin.exists() {
                fs::copy(common::BIN, &bin).unwrap();
            }
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={u}"),
                format!("--regid={u}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(&bin);
            c
        }
        None => Command::new(common::BIN),
    };
    cmd.args(args)
        .arg(job)
        .env("SUPERVISE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    common::cap_memory(&mut cmd);
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break match st.signal() {
                Some(_) => None,
                None => st.code(),
            };
        }
        if t0.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    Ran { code, out, took }
}

/// `images` and `verify` return (within the bound) and name `file` and
/// what is wrong with it (`word`).
fn images_and_verify_name(env: &Env, job: &Path, file: &Path, word: &str) {
    for args in [&["images"][..], &["verify"][..]] {
        let r = run_bounded(env, args, job, None);
        assert!(
            r.code.is_some(),
            "{args:?} hung or crashed ({:?}):\n{}",
            r.took,
            r.out
        );
        assert!(
            r.out.contains(&file.display().to_string()) && r.out.contains(word),
            "{args:?} does not name the file:\n{}",
            r.out
        );
    }
}

/// Sorted names in `dir`.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Starts `supervise run job` and expects it to refuse within a bound
/// (exit 2); returns its log.
fn expect_refusal(env: &Env, job: &Path) -> String {
    let mut sup = env.start(job);
    let t0 = Instant::now();
    let code = sup.wait_exit(BOUND);
    assert_eq!(code, 2, "supervise must refuse; log:\n{}", sup.log());
    assert!(t0.elapsed() < BOUND);
    sup.log()
}

/// The one line of the log that names `needle`.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert!(!lines.is_empty(), "no line names {needle}; log:\n{log}");
    lines[0]
}

/// Attack 1: nobody pre-creates the image directory (its own, mode 0700)
/// before supervise first runs the job. supervise must refuse it, naming
/// the path, the owner and the mode, start no job and write nothing into
/// it; likewise below a directory nobody owns. A store supervise made
/// itself cannot be planted into by nobody.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn planted_image_dir_is_refused() {
    let env = Env::new();
    open_up(&env);
    // Directly, in /tmp (root-owned, sticky): the attacker's own 0700 dir.
    let planted = std::env::temp_dir().join(format!(
        "supervise-planted-{}",
        env.path().file_name().unwrap().to_string_lossy()
    ));
    nobody(&format!("mkdir -m 0700 {}", planted.display()));
    let job = counter_job(&env, "planted", &planted.display().to_string());
    let log = expect_refusal(&env, &job);
    let line = line_with(&log, &planted.display().to_string());
    assert!(line.contains("uid 65534"), "{line}");
    assert!(line.contains("mode 0700"), "{line}");
    assert!(
        !env.path().join("planted.out").exists(),
        "a job was started"
    );
    assert!(
        listing(&planted).is_empty(),
        "something was written into it"
    );
    fs::remove_dir(&planted).unwrap();

    // Below a directory nobody owns: refused, nothing created.
    let theirs = attacker_dir(&env, "scratch");
    let below = theirs.join("project/images");
    let job = counter_job(&env, "below", &below.display().to_string());
    let log = expect_refusal(&env, &job);
    let line = line_with(&log, &below.display().to_string());
    assert!(line.contains("uid 65534"), "{line}");
    assert!(line.contains(&theirs.display().to_string()), "{line}");
    assert!(!env.path().join("below.out").exists(), "a job was started");
    assert!(
        listing(&theirs).is_empty(),
        "created below an attacker's dir"
    );

    // A store that passes the check: nobody cannot add anything to it.
    let good = env.path().join("good-images");
    supervise::store::ImageStore::open(&good).unwrap();
    for target in [
        good.join("000009-20300101T000000Z"),
        good.join("packs/x"),
        good.join(".staging-000009"),
    ] {
        let out = as_nobody(&format!("mkdir {}", target.display()))
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody created {}", target.display());
        assert!(!target.exists());
    }
    let out = as_nobody(&format!("ln -s /etc {}", good.join("packs2").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The tag supervise derives from a job's restore fallback dir.
fn path_tag(p: &Path) -> String {
    blake3::hash(p.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string()
}

/// Attack 4: nobody pre-creates every plausible scratch and staging name
/// on `/dev/shm` (directories, a symlink, and keeps re-creating the fixed
/// name of earlier releases). The job is SIGKILLed: supervise still
/// restores it from its image, the counter continues from the checkpoint.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn predictable_scratch_names_cannot_block_a_restore() {
    let env = Env::new();
    open_up(&env);
    let job = counter_job(&env, "scratchy", "images-scratchy");
    let cfg = supervise::config::JobConfig::load(&job).unwrap();
    let restore_tag = path_tag(&cfg.state_dir.join("restore"));
    let staging_tag = path_tag(&cfg.checkpoint.dir);
    let shm = Path::new("/dev/shm");
    let mut planted = vec![
        shm.join(format!("supervise-restore-{restore_tag}")),
        shm.join(format!("supervise-restore-{restore_tag}-")),
    ];
    for i in 0..20 {
        planted.push(shm.join(format!("supervise-restore-{restore_tag}-{i}")));
        planted.push(shm.join(format!("supervise-staging-{staging_tag}-{i:06}")));
        planted.push(shm.join(format!("supervise-staging-{staging_tag}-{i:06}-")));
    }
    let mut script = String::new();
    for p in &planted {
        script.push_str(&format!("mkdir -m 0777 {} && ", p.display()));
    }
    let link = shm.join(format!("supervise-restore-{restore_tag}-link"));
    script.push_str(&format!(
        "ln -s {} {}",
        env.path().display(),
        link.display()
    ));
    nobody(&script);
    planted.push(link);
    // And keeps re-creating the fixed name of earlier releases as fast as
    // it can, to win the race against a remove-then-create.
    let fixed = shm.join(format!("supervise-restore-{restore_tag}"));
    let mut recreate = as_nobody(&format!(
        "exec python3 -c 'import os\nwhile True:\n try: os.mkdir(\"{}\")\n except OSError: pass'",
        fixed.display()
    ))
    .spawn()
    .unwrap();

    let sup = env.start(&job);
    sup.wait_checkpoints("scratchy", 2, T);
    sup.kill_job("scratchy");
    sup.wait_restores("scratchy", 1, T);
    let out = env.path().join("scratchy.out");
    let n = env.numbers("scratchy.out").len();
    common::wait_numbers(&out, n + 3, T);
    let nums = env.numbers("scratchy.out");
    // Restored from the image: 0, 1, 2, ... without starting over at 0.
    common::assert_exactly_once(&nums);
    let log = sup.log();
    assert!(
        !log.contains("starting the command afresh") && !log.contains("cannot restore"),
        "progress lost:\n{log}"
    );
    drop(sup);

    common::kill(recreate.id() as i32, libc::SIGKILL);
    let _ = recreate.wait();
    // The attacker's entries were left alone (they are not ours)...
    for p in &planted {
        let md = fs::symlink_metadata(p).expect("attacker entry left alone");
        assert_eq!(md.uid(), NOBODY, "{}", p.display());
    }
    // ...and are cleaned up here.
    for p in &planted {
        let md = fs::symlink_metadata(p).unwrap();
        if md.is_dir() {
            let _ = fs::remove_dir_all(p);
        } else {
            let _ = fs::remove_file(p);
        }
    }
    // Nothing of ours is left on /dev/shm.
    for e in fs::read_dir(shm).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("supervise-restore-{restore_tag}"))
            || name.starts_with(&format!("supervise-staging-{staging_tag}"))
        {
            panic!("left on /dev/shm: {name}");
        }
    }
}

/// Runs the job until it has three images, then stops it (final
/// checkpoint); returns the images' paths, newest first.
fn three_images(env: &Env, job: &Path, name: &str) -> Vec<PathBuf> {
    let mut sup = env.start(job);
    sup.wait_checkpoints(name, 3, T);
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_exit(T), 0, "{}", sup.log());
    let imgs = common::images(job);
    assert!(imgs.len() >= 3, "{name}: {imgs:?}");
    imgs.iter()
        .map(|i| PathBuf::from(i["path"].as_str().unwrap()))
        .collect()
}

/// Attack 6: a FIFO in place of the newest image's manifest and a symlink
/// to /dev/zero in place of a pack index (hostile files in a still trusted
/// store). `images` and `verify` return within a bound naming the file;
/// `supervise run` skips the image, restores an older one and still stops
/// on SIGTERM.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn fifo_manifest_and_dev_zero_index_neither_hang_nor_block_a_restore() {
    let env = Env::new();
    let job = counter_job(&env, "hostile", "images-hostile");
    let paths = three_images(&env, &job, "hostile");
    let (newest, older) = (&paths[0], &paths[1]);
    let older_id = older.file_name().unwrap().to_string_lossy().into_owned();

    // A FIFO as the manifest (MANIFEST.sealed: the store is encrypted).
    let manifest = newest.join("MANIFEST.sealed");
    assert!(manifest.exists());
    let saved = env.path().join("saved-manifest");
    fs::rename(&manifest, &saved).unwrap();
    nix::unistd::mkfifo(&manifest, nix::sys::stat::Mode::S_IRWXU).unwrap();
    images_and_verify_name(&env, &job, &manifest, "FIFO");
    assert_eq!(run_bounded(&env, &["verify"], &job, None).code, Some(1));
    fs::remove_file(&manifest).unwrap();
    fs::rename(&saved, &manifest).unwrap();

    // A symlink to /dev/zero as the newest image's pack index.
    let pack = common::newest_pack(&common::images(&job)[0]);
    let idx = pack.with_extension("idx");
    let saved_idx = env.path().join("saved-idx");
    fs::rename(&idx, &saved_idx).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &idx).unwrap();
    images_and_verify_name(&env, &job, &idx, "symlink");
    assert_eq!(run_bounded(&env, &["verify"], &job, None).code, Some(1));
    fs::remove_file(&idx).unwrap();
    fs::rename(&saved_idx, &idx).unwrap();

    // `run` with the FIFO manifest: skips that image, restores the older
    // one, and SIGTERM still stops it.
    fs::rename(&manifest, &saved).unwrap();
    nix::unistd::mkfifo(&manifest, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut sup = env.start(&job);
    sup.wait_restores("hostile", 1, T);
    assert_eq!(common::ids(&sup.log(), "restored"), vec![older_id]);
    assert!(sup.log().contains(&manifest.display().to_string()));
    sup.signal(libc::SIGTERM);
    let t0 = Instant::now();
    assert_eq!(sup.wait_exit(BOUND), 0, "{}", sup.log());
    assert!(t0.elapsed() < BOUND);
    fs::remove_file(&manifest).unwrap();
}

/// Attack 8: a directory holding unrelated files (as /etc) as the image
/// directory: refused by name, nothing created in it.
#[test]
#[cfg_attr(not(criu), ignore = "needs root and CRIU >= 4.2 (scripts/setup.sh)")]
fn foreign_directory_is_not_taken_as_a_store() {
    let env = Env::new();
    let etc = env.path().join("etc");
    fs::create_dir(&etc).unwrap();
    fs::write(etc.join("passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(etc.join("hostname"), b"node1\n").unwrap();
    fs::create_dir(etc.join("ssh")).unwrap();
    let before = listing(&etc);
    let job = counter_job(&env, "etc", &etc.display().to_string());
    let log = expect_refusal(&env, &job);
    let line = line_with(&log, "not a supervise image store");
    assert!(line.contains(&etc.display().to_string()), "{line}");
    assert!(line.contains("`hostname`"), "{line}");
    assert_eq!(listing(&etc), before, "something was created in it");
    assert!(!env.path().join("etc.out").exists(), "a job was started");
}

/// A user who may not read root's store gets "permission denied: PATH"
/// and exit 1 from `images`, `verify` and `gc`, never an empty listing.
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn unreadable_store_is_permission_denied_not_empty() {
    let env = Env::new();
    open_up(&env);
    // An explicit dir and the default one (below .supervise/, 0700).
    let explicit = counter_job(&env, "explicit", "images-explicit");
    let default = JobFile::counter("default").write(&env);
    for job in [&explicit, &default] {
        let cfg = supervise::config::JobConfig::load(job).unwrap();
        fs::create_dir_all(&cfg.state_dir).unwrap();
        fs::set_permissions(
            env.path().join(".supervise"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let store = supervise::store::ImageStore::open(&cfg.checkpoint.dir).unwrap();
        let st = store.begin().unwrap();
        fs::write(st.path().join("core-1.img"), b"core").unwrap();
        st.commit(supervise::store::CheckpointMeta {
            job: cfg.name.clone(),
            criu_version: "4.2.1".into(),
            duration_ms: 1,
            frozen_us: None,
            pages_written: None,
            root_pid: 1000,
            extra: Default::default(),
        })
        .unwrap();
        for args in [&["images"][..], &["verify"][..], &["gc"][..]] {
            let r = run_bounded(&env, args, job, Some(NOBODY));
            assert_eq!(r.code, Some(1), "{args:?} {}:\n{}", job.display(), r.out);
            assert!(
                r.out.contains("permission denied: "),
                "{args:?} {}:\n{}",
                job.display(),
                r.out
            );
            assert!(
                !r.out.contains("ID "),
                "{args:?} printed a table:\n{}",
                r.out
            );
        }
        // Root still reads it.
        assert_eq!(common::images(job).len(), 1);
    }
    // The attacker's own copy of the binary, for completeness of cleanup.
    chown(&env.path().join("supervise-bin"), 0);
}
