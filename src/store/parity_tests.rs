//! Unit tests of `parity.rs`.
use super::*;
use proptest::prelude::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// Deterministic pseudo-random bytes (xorshift64*).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn setup(data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("abcd.pack");
    fs::write(&p, data).unwrap();
    (t, p)
}

/// The lost-tail length the module docs promise for a file of `len`.
fn guaranteed_tail(len: u64) -> u64 {
    if len < 12 * 1024 {
        len
    } else if len >= 750 * 1024 {
        len * 6 / 100
    } else {
        6 * 1024
    }
}

fn assert_clean(p: &Path, data: &[u8]) {
    let rep = check(p).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(fs::read(p).unwrap(), data);
}

#[test]
fn layout_edges() {
    for len in [
        0u64,
        1,
        63,
        64,
        4095,
        4096,
        8191,
        8192,
        8193,
        12287,
        12288,
        65535,
        65536,
        1 << 20,
        1 << 30,
    ] {
        let l = Layout::for_len(len);
        assert!(l.s % 64 == 0 && l.s >= 64 && l.w % 64 == 0, "{l:?}");
        assert!(l.k as u64 * l.s >= len, "{l:?}");
        assert!(l.k == 1 || l.s >= 4096, "{l:?}");
        assert_eq!(l.m, if l.k == 1 { 1 } else { 2 }, "{l:?}");
        assert!((l.rows - 1) * l.w < l.s && l.rows * l.w >= l.s);
        assert_eq!(l.par_len(), 2 * l.copy_len() + l.m as u64 * l.s);
        let h = l.header();
        assert_eq!(Layout::parse_header(&h), Some(l));
        // An m other than the one L implies is refused.
        for m in [0u16, 1, 2, 3] {
            let mut h = h;
            h[18..20].copy_from_slice(&m.to_le_bytes());
            assert_eq!(Layout::parse_header(&h).is_some(), m as usize == l.m);
        }
    }
    assert_eq!(Layout::for_len(0).k, 1);
    assert_eq!(Layout::for_len(8191).k, 1);
    assert_eq!(Layout::for_len(8192).m, 2);
    assert_eq!(Layout::for_len(1 << 30).k, 32);
    assert_eq!(Layout::for_len(1 << 30).rows, 512);
}

#[test]
fn tail_tolerance_bound() {
    let mut lens: Vec<u64> = (0..300_000).step_by(61).collect();
    lens.extend((0..2000).map(|i| 300_000 + i * 1_048_573));
    lens.extend([(1 << 30) + 1, 1 << 34, (1 << 40) - 7]);
    for len in lens {
        let l = Layout::for_len(len);
        assert!(
            l.tail_tolerance() >= guaranteed_tail(len),
            "L={len}: {} < {}",
            l.tail_tolerance(),
            guaranteed_tail(len)
        );
    }
}

#[test]
fn round_trip_sizes() {
    for (n, len) in [0usize, 1, 63, 4095, 4096, 8193, 100_000, 5 << 20]
        .into_iter()
        .enumerate()
    {
        let data = bytes(n as u64, len);
        let (_t, p) = setup(&data);
        let size = write_for_file(&p).unwrap();
        assert_eq!(fs::metadata(par_path(&p)).unwrap().len(), size);
        assert_eq!(
            fs::metadata(par_path(&p)).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (got, rep) = read_all(&p, u64::MAX).unwrap();
        assert_eq!(got, data, "len {len}");
        assert!(rep.is_empty());
        assert_eq!(rep.to_string(), "intact");
        assert_clean(&p, &data);
        // write_for_bytes produces the same sidecar.
        let a = fs::read(par_path(&p)).unwrap();
        write_for_bytes(&p, &data).unwrap();
        assert_eq!(fs::read(par_path(&p)).unwrap(), a);
        if len > 10 {
            let (got, _) = read_range(&p, 3, len - 10).unwrap();
            assert_eq!(got, &data[3..len - 7]);
        }
        assert!(matches!(
            read_range(&p, len as u64, 1),
            Err(ParityError::OutOfRange { .. })
        ));
        // Lost entirely: only tiny files come back.
        fs::remove_file(&p).unwrap();
        let l = Layout::for_len(len as u64);
        match read_all(&p, u64::MAX) {
            Ok((got, _)) => assert_eq!(got, data),
            Err(e) => {
                assert!(l.k > l.m, "{e}");
                assert!(e.to_string().contains("unrecoverable"), "{e}");
            }
        }
        if l.k <= l.m {
            repair(&p).unwrap();
            assert_clean(&p, &data);
        }
        // No temporary files are left behind.
        for e in fs::read_dir(_t.path()).unwrap() {
            let name = e.unwrap().file_name();
            assert!(!name.to_string_lossy().starts_with(".tmp-"), "{name:?}");
        }
    }
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(u64),
    Zero4k(u64),
    Truncate(u64),
    ParFlip(u64),
    ParZero4k(u64),
    ParTruncate(u64),
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<u64>().prop_map(Damage::Flip),
        any::<u64>().prop_map(Damage::Zero4k),
        any::<u64>().prop_map(Damage::Truncate),
        any::<u64>().prop_map(Damage::ParFlip),
        any::<u64>().prop_map(Damage::ParZero4k),
        any::<u64>().prop_map(Damage::ParTruncate),
    ]
}

fn zero_at(p: &Path, off: u64, n: u64) {
    let mut v = fs::read(p).unwrap();
    let off = off as usize % v.len().max(1);
    let end = (off + n as usize).min(v.len());
    v[off..end].fill(0);
    fs::write(p, v).unwrap();
}

fn flip_at(p: &Path, off: u64) {
    let mut v = fs::read(p).unwrap();
    if v.is_empty() {
        return;
    }
    let i = off as usize % v.len();
    v[i] ^= 0x5a;
    fs::write(p, v).unwrap();
}

fn apply(p: &Path, len: u64, d: &Damage) {
    let par = par_path(p);
    let par_len = fs::metadata(&par).unwrap().len();
    match *d {
        Damage::Flip(o) => flip_at(p, o),
        Damage::Zero4k(o) => zero_at(p, o, 4096),
        Damage::Truncate(t) => {
            let t = t % (guaranteed_tail(len) + 1);
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(len - t).unwrap();
        }
        Damage::ParFlip(o) => flip_at(&par, o),
        Damage::ParZero4k(o) => zero_at(&par, o, 4096),
        Damage::ParTruncate(t) => {
            let t = t % (par_len * 12 / 100 + 1);
            let f = fs::OpenOptions::new().write(true).open(&par).unwrap();
            f.set_len(par_len - t).unwrap();
        }
    }
}

/// One damage of `d` to a file of `len` bytes and its `.par`.
fn one_damage(len: usize, seed: u64, d: Damage, ra: u64, rb: u64) -> Result<(), TestCaseError> {
    let data = bytes(seed, len);
    let (_t, p) = setup(&data);
    write_for_file(&p).unwrap();
    let par_orig = fs::read(par_path(&p)).unwrap();
    apply(&p, len as u64, &d);
    let par_hit = matches!(
        d,
        Damage::ParFlip(_) | Damage::ParZero4k(_) | Damage::ParTruncate(_)
    );
    match read_all(&p, len as u64) {
        Ok((got, _)) => prop_assert!(got == data),
        Err(ParityError::TablesDamaged { .. }) if par_hit => {
            // Both table copies of a small .par under one region:
            // F is intact, parity cannot vouch for it; the store
            // verifies F itself and regenerates the .par.
            prop_assert!(fs::read(&p).unwrap() == data);
            let tables_gone =
                |r: Result<(), ParityError>| matches!(r, Err(ParityError::TablesDamaged { .. }));
            prop_assert!(tables_gone(read_range(&p, 0, 1).map(drop)), "read_range");
            prop_assert!(tables_gone(repair(&p).map(drop)), "repair");
            prop_assert!(fs::read(&p).unwrap() == data);
            rewrite_par(&p).unwrap();
            prop_assert!(fs::read(par_path(&p)).unwrap() == par_orig);
            prop_assert!(check(&p).unwrap().is_clean());
            return Ok(());
        }
        Err(e) => prop_assert!(false, "{:?}: {}", d, e),
    }
    let a = (ra % len as u64) as usize;
    let n = (rb % (len - a + 1) as u64) as usize;
    let (got, _) = read_range(&p, a as u64, n).unwrap();
    prop_assert!(got[..] == data[a..a + n]);
    let rep = check(&p).unwrap();
    prop_assert!(rep.recoverable);
    let done = repair(&p).unwrap();
    prop_assert_eq!(done.file_rewritten, rep.file_damaged());
    prop_assert_eq!(done.par_rewritten, rep.par_damaged());
    prop_assert!(fs::read(&p).unwrap() == data);
    prop_assert!(check(&p).unwrap().is_clean());
    prop_assert!(fs::read(par_path(&p)).unwrap() == par_orig);
    if done.file_rewritten {
        prop_assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn one_damage_is_repaired(
        len in 1usize..(2 << 20),
        seed in any::<u64>(),
        d in damage_strategy(),
        ra in any::<u64>(),
        rb in any::<u64>(),
    ) {
        one_damage(len, seed, d, ra, rb)?;
    }

    /// Small files: k = 1..4, `.par`s of a few KiB that one 4 KiB
    /// region can cover entirely.
    #[test]
    fn one_damage_to_a_small_file(
        len in 1usize..20_000,
        seed in any::<u64>(),
        d in damage_strategy(),
        ra in any::<u64>(),
        rb in any::<u64>(),
    ) {
        one_damage(len, seed, d, ra, rb)?;
    }
}

#[test]
fn repaired_says_what_was_rebuilt() {
    let data = bytes(7, 2 << 20); // k = 32, s = w = 64 KiB
    let (_t, p) = setup(&data);
    write_for_file(&p).unwrap();
    zero_at(&p, 3 * 65536 + 100, 10);
    let (got, rep) = read_range(&p, 3 * 65536, 200).unwrap();
    assert_eq!(got, &data[3 * 65536..3 * 65536 + 200]);
    assert_eq!(
        rep.to_string(),
        "rebuilt 1 row of shard 3 (64 KiB at offset 196608) from parity"
    );
    // A range elsewhere reads no parity and rebuilds nothing.
    let (_, rep) = read_range(&p, 0, 100).unwrap();
    assert!(rep.is_empty());
    let done = repair(&p).unwrap();
    assert!(done.file_rewritten && !done.par_rewritten);
    assert_eq!(done.repaired.shards(), vec![3]);
    assert_clean(&p, &data);
}

#[test]
fn more_damage_than_parity_is_refused() {
    let data = bytes(9, 1 << 20);
    let (_t, p) = setup(&data);
    write_for_file(&p).unwrap();
    // k = 32, s = w = 32 KiB: one row.
    for i in [2u64, 5, 9] {
        zero_at(&p, i * 32768 + 7, 1);
        flip_at(&p, i * 32768 + 8);
    }
    let damaged = fs::read(&p).unwrap();
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(
        e.contains("abcd.pack: 3 of 34 shards damaged in row 0, parity repairs 2: unrecoverable"),
        "{e}"
    );
    // A range inside an intact shard still reads.
    let (got, _) = read_range(&p, 0, 1000).unwrap();
    assert_eq!(got, &data[..1000]);
    let rep = check(&p).unwrap();
    assert!(!rep.recoverable);
    assert_eq!(rep.data_damaged, vec![(2, 0), (5, 0), (9, 0)]);
    let e = repair(&p).unwrap_err().to_string();
    assert!(e.contains("unrecoverable"), "{e}");
    assert_eq!(fs::read(&p).unwrap(), damaged);
    // Too large for the caller.
    let e = read_all(&p, 1000).unwrap_err().to_string();
    assert!(e.contains("more than the limit of 1000"), "{e}");
}

#[test]
fn garbage_or_missing_par_is_an_error() {
    let data = bytes(3, 100_000);
    let (t, p) = setup(&data);
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(e.ends_with("abcd.pack.par: missing"), "{e}");
    let par = par_path(&p);
    for (i, garbage) in [
        vec![],
        b"SVPAR001".to_vec(),
        bytes(1, 50_000),
        {
            // A header claiming a huge file, in a tiny .par.
            let mut h = Layout::for_len(1 << 47).header().to_vec();
            h.extend_from_slice(&[0u8; 100]);
            h
        },
        {
            // Valid header and length field, nonsense after it.
            let mut h = Layout::for_len(u64::MAX >> 8).header().to_vec();
            h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            h
        },
    ]
    .into_iter()
    .enumerate()
    {
        fs::write(&par, &garbage).unwrap();
        let e = read_all(&p, u64::MAX).unwrap_err().to_string();
        assert!(
            e.contains("both copies of its table are damaged"),
            "{i}: {e}"
        );
        assert!(check(&p).is_err());
        assert!(repair(&p).is_err());
        assert_eq!(fs::read(&p).unwrap(), data);
    }
    // Both copies damaged (one region per copy: two damages).
    write_for_file(&p).unwrap();
    let l = Layout::for_len(data.len() as u64);
    flip_at(&par, 40);
    flip_at(&par, l.copy_b_off() + 40);
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("abcd.pack.par: both copies"), "{e}");
    // Truncated to a prefix of copy A.
    write_for_file(&p).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&par)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(read_all(&p, u64::MAX).is_err());
    drop(t);
}

#[test]
fn symlinks_are_not_followed() {
    let data = bytes(4, 20_000);
    let (t, p) = setup(&data);
    write_for_file(&p).unwrap();
    // A symlinked F.
    let real = t.path().join("real");
    fs::rename(&p, &real).unwrap();
    std::os::unix::fs::symlink(&real, &p).unwrap();
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("is a symlink"), "{e}");
    assert!(check(&p).is_err());
    assert!(repair(&p).is_err());
    assert!(write_for_file(&p).is_err());
    assert!(fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
    fs::remove_file(&p).unwrap();
    fs::rename(&real, &p).unwrap();
    // A symlinked F.par.
    let par = par_path(&p);
    let real_par = t.path().join("real.par");
    fs::rename(&par, &real_par).unwrap();
    std::os::unix::fs::symlink(&real_par, &par).unwrap();
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("abcd.pack.par is a symlink"), "{e}");
    assert!(repair(&p).is_err());
    // Writing replaces the symlink, never writes through it.
    let before = fs::read(&real_par).unwrap();
    write_for_file(&p).unwrap();
    assert!(!fs::symlink_metadata(&par).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&real_par).unwrap(), before);
    // A FIFO in place of F.
    fs::remove_file(&p).unwrap();
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let e = read_all(&p, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("FIFO"), "{e}");
}

#[test]
fn either_table_copy_suffices() {
    for len in [0usize, 1, 1536, 5000, 100_000, 3 << 20] {
        let data = bytes(len as u64, len);
        let (_t, p) = setup(&data);
        write_for_file(&p).unwrap();
        let par = par_path(&p);
        let orig = fs::read(&par).unwrap();
        let l = Layout::for_len(len as u64);
        assert_eq!(orig.len() as u64, l.par_len());
        // All of copy A zeroed, then all of copy B (at the end).
        for off in [0, l.copy_b_off()] {
            zero_at(&par, off, l.copy_len());
            assert_eq!(read_all(&p, u64::MAX).unwrap().0, data, "{len} {off}");
            let rep = check(&p).unwrap();
            assert_eq!(rep.bad_table_copies, 1, "{len} {off}");
            let done = repair(&p).unwrap();
            assert!(done.par_rewritten && !done.file_rewritten);
            assert_eq!(fs::read(&par).unwrap(), orig);
        }
        // Only copy A left (copy B and all parity lost): F still reads.
        fs::OpenOptions::new()
            .write(true)
            .open(&par)
            .unwrap()
            .set_len(l.copy_len())
            .unwrap();
        assert_eq!(read_all(&p, u64::MAX).unwrap().0, data, "{len}");
        let rep = check(&p).unwrap();
        assert!(rep.par_size_wrong && rep.bad_table_copies == 1, "{rep:?}");
        assert!(repair(&p).unwrap().par_rewritten);
        assert_eq!(fs::read(&par).unwrap(), orig);
        // Both copies gone: an error, not a guess; F is left alone and
        // rewrite_par (after the store verified F) restores the .par.
        flip_at(&par, 40);
        flip_at(&par, l.copy_b_off() + 40);
        for e in [
            read_all(&p, u64::MAX).unwrap_err(),
            read_range(&p, 0, 0).unwrap_err(),
            check(&p).unwrap_err(),
            repair(&p).unwrap_err(),
        ] {
            assert!(matches!(e, ParityError::TablesDamaged { .. }), "{e}");
            assert!(e.to_string().contains("abcd.pack.par: both copies"), "{e}");
        }
        assert_eq!(fs::read(&p).unwrap(), data);
        assert_eq!(rewrite_par(&p).unwrap(), l.par_len());
        assert_eq!(fs::read(&par).unwrap(), orig);
    }
    // A small .par is covered by one 4 KiB region.
    let data = bytes(2, 1536);
    let (_t, p) = setup(&data);
    write_for_file(&p).unwrap();
    assert!(Layout::for_len(1536).par_len() < 4096);
    zero_at(&par_path(&p), 0, 4096);
    assert!(matches!(
        read_all(&p, u64::MAX),
        Err(ParityError::TablesDamaged { .. })
    ));
}

#[test]
fn lost_tail_up_to_the_layout_limit() {
    for len in [
        12_288usize,
        20_000,
        65_535,
        65_536,
        100_000,
        131_073,
        179_200,
        768_000,
        1 << 20,
        3_333_333,
    ] {
        let data = bytes(len as u64, len);
        let (_t, p) = setup(&data);
        write_for_file(&p).unwrap();
        let l = Layout::for_len(len as u64);
        let t = l.tail_tolerance();
        assert!(t >= guaranteed_tail(len as u64));
        fs::write(&p, &data[..len - t as usize]).unwrap();
        assert_eq!(read_all(&p, u64::MAX).unwrap().0, data, "{len}");
        repair(&p).unwrap();
        assert_clean(&p, &data);
        // One byte more is beyond parity.
        fs::write(&p, &data[..len - t as usize - 1]).unwrap();
        assert!(read_all(&p, u64::MAX).is_err(), "{len}");
        assert!(repair(&p).is_err());
    }
}

#[test]
fn garbage_appended_is_dropped_by_repair() {
    let data = bytes(5, 30_000);
    let (_t, p) = setup(&data);
    write_for_file(&p).unwrap();
    let mut v = data.clone();
    v.extend_from_slice(b"garbage");
    fs::write(&p, &v).unwrap();
    assert_eq!(read_all(&p, u64::MAX).unwrap().0, data);
    let rep = check(&p).unwrap();
    assert!(rep.file_damaged() && rep.data_damaged.is_empty());
    assert!(repair(&p).unwrap().file_rewritten);
    assert_clean(&p, &data);
}

#[test]
fn overhead_numbers() {
    for len in [1536u64, 4096, 16384, 256 << 10, 1 << 20, 64 << 20] {
        let l = Layout::for_len(len);
        println!(
            "L = {len}: k = {}, m = {}, s = {}, rows = {}, .par = {} bytes, overhead {:.4}",
            l.k,
            l.m,
            l.s,
            l.rows,
            l.par_len(),
            l.par_len() as f64 / len as f64
        );
    }
    // The actual file agrees with the computed size.
    for len in [1536usize, 4096, 16384, 256 << 10, 1 << 20] {
        let data = bytes(1, len);
        let (_t, p) = setup(&data);
        let size = write_for_file(&p).unwrap();
        assert_eq!(size, Layout::for_len(len as u64).par_len());
        assert_eq!(fs::metadata(par_path(&p)).unwrap().len(), size);
    }
    assert_eq!(Layout::for_len(4096).par_len(), 4296);
    assert!(Layout::for_len(256 << 10).par_len() * 1000 / (256 << 10) <= 68);
    assert!(Layout::for_len(64 << 20).par_len() * 1000 / (64 << 20) <= 64);
}

/// `cargo test --release --lib -- --ignored parity --nocapture`
#[test]
#[ignore = "timing; run in release"]
fn encode_throughput() {
    let len = 256usize << 20;
    let data = bytes(11, len);
    let (_t, p) = setup(&data);
    drop(data);
    let _ = fs::read(&p).unwrap(); // into the page cache
    let start = std::time::Instant::now();
    write_for_file(&p).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "write_for_file: {len} bytes in {secs:.3} s = {:.0} MB/s",
        len as f64 / secs / 1e6
    );
    let start = std::time::Instant::now();
    let rep = check(&p).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(rep.is_clean());
    println!("check: {:.0} MB/s", len as f64 / secs / 1e6);
}
