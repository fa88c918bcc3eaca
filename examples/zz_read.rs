fn main() {
    let a: Vec<String> = std::env::args().collect();
    let opts = supervise::store::StoreOptions::new(a[3].clone().into());
    let s = supervise::store::ImageStore::open_read_only_with(std::path::Path::new(&a[1]), &opts)
        .unwrap();
    let img = s.list().unwrap().into_iter().next().unwrap();
    let r = s.file_reader(&img, &a[2]).unwrap();
    for step in [64u64 << 10, 1 << 20, 4 << 20] {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let mut off = 0;
        while off < r.size() {
            let n = step.min(r.size() - off);
            out.clear();
            r.read_at(off, n, &mut out).unwrap();
            off += n;
        }
        println!(
            "step {} KiB: read {} MiB in {:?}",
            step >> 10,
            r.size() >> 20,
            t.elapsed()
        );
    }
}
