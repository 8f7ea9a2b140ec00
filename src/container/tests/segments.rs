//! Data segments (file data outside redb's store) and the store segment map,
//! FORMAT.md §4.10, against real files and a real redb.

use super::*;

const SEG: u64 = SEGMENT_SECTORS;

/// `n` sectors of a pattern seeded by `seed`.
fn sectors(n: u64, seed: u8) -> Vec<u8> {
    pattern(n as usize * SECTOR_SIZE, seed)
}

fn read_data(store: &SectorStore, first: u64, n: u64) -> Vec<u8> {
    let mut out = vec![0xa5u8; n as usize * SECTOR_SIZE];
    store.read_data_sectors(first, &mut out).unwrap();
    out
}

fn raw_versions(path: &Path) -> [u16; 2] {
    let raw = std::fs::read(path).unwrap();
    HEADER_COPY_OFFSETS.map(|at| {
        let at = at as usize + H_VERSION;
        u16::from_le_bytes([raw[at], raw[at + 1]])
    })
}

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// A value of `len` bytes for key `key`.
fn value(key: &str, len: usize) -> Vec<u8> {
    pattern(len, key.len() as u8 ^ key.as_bytes()[0])
}

/// Put `n` values of 1 MiB named `{prefix}{i}` in one transaction each.
fn put_mebibytes(db: &Database, prefix: &str, n: usize) {
    for i in 0..n {
        let key = format!("{prefix}{i}");
        put(db, &[(&key, &value(&key, 1 << 20))]);
    }
}

fn check_mebibytes(db: &impl ReadableDatabase, prefix: &str, n: usize) {
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(TABLE).unwrap();
    for i in 0..n {
        let key = format!("{prefix}{i}");
        let got = t.get(key.as_str()).unwrap().map(|v| v.value().to_vec());
        assert!(got.as_deref() == Some(&value(&key, 1 << 20)[..]), "{key}");
    }
}

/// The physical segments the header gives redb's store.
fn store_segments(path: &Path) -> Vec<u64> {
    Container::inspect(path)
        .unwrap()
        .store_segments
        .unwrap()
        .iter()
        .flat_map(|&(first, n)| u64::from(first)..u64::from(first) + u64::from(n))
        .collect()
}

#[test]
fn a_version_3_vault_keeps_its_identity_map_until_a_segment_is_claimed() {
    let v = create_vault(None);
    assert_eq!(raw_versions(&v.path), [3, 3]);
    {
        // More than one segment of store: pages cross segment boundaries.
        let db = open_db(unlock(&v.path, Access::ReadWrite));
        put_mebibytes(&db, "a", 6);
    }
    let info = Container::inspect(&v.path).unwrap();
    assert!(info.extent_sectors > SEG, "{info:?}");
    assert_eq!((info.version, info.store_segments), (3, None));
    assert_eq!(raw_versions(&v.path), [3, 3]);
    {
        let store = unlock(&v.path, Access::ReadWrite);
        assert_eq!(store.data_segment_sectors(), SEG);
        // Nothing is a data sector without a claim.
        let e = store
            .write_data_sectors(2 * SEG, &sectors(1, 1))
            .unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EINVAL));
        let db = open_db(store);
        check_mebibytes(&db, "a", 6);
        put_mebibytes(&db, "b", 2);
    }
    assert_eq!(raw_versions(&v.path), [3, 3]);
    let db = open_db(unlock(&v.path, Access::ReadWrite));
    check_mebibytes(&db, "a", 6);
    check_mebibytes(&db, "b", 2);
}

#[test]
fn data_segments_interleave_with_store_growth_and_survive_a_reopen() {
    let v = create_vault(None);
    let store = Arc::new(unlock(&v.path, Access::ReadWrite));
    let (d1, d2);
    {
        let db = open_db(Shared::new(&store, -1));
        put_mebibytes(&db, "a", 3);
        d1 = store.claim_data_segment().unwrap();
        assert_eq!(d1 % SEG, 0);
        store.write_data_sectors(d1, &sectors(SEG, 1)).unwrap();
        // The store grows past the data segment.
        put_mebibytes(&db, "b", 12);
        d2 = store.claim_data_segment().unwrap();
        assert!(d2 > d1 + SEG, "the store grew between: {d1} {d2}");
        // Half a segment, in runs of 1 MiB.
        for run in 0..2 {
            let first = d2 + run * 256;
            store
                .write_data_sectors(first, &sectors(256, 10 + run as u8))
                .unwrap();
        }
        put_mebibytes(&db, "c", 2);
        check_mebibytes(&db, "a", 3);
        assert!(read_data(&store, d1, SEG) == sectors(SEG, 1));
    }
    store.close().unwrap();
    drop(store);

    let info = Container::inspect(&v.path).unwrap();
    assert_eq!(info.version, FORMAT_VERSION);
    assert_eq!(raw_versions(&v.path), [4, 4]);
    let segs = store_segments(&v.path);
    assert!(info.store_segments.as_ref().unwrap().len() >= 2, "{info:?}");
    assert!(!segs.contains(&(d1 / SEG)) && !segs.contains(&(d2 / SEG)));
    assert!(
        segs.iter().any(|&q| q > d1 / SEG && q < d2 / SEG),
        "{segs:?}"
    );
    assert_eq!(segs[0], 0);

    let store = Arc::new(unlock(&v.path, Access::ReadWrite));
    assert!(read_data(&store, d1, SEG) == sectors(SEG, 1));
    let back = read_data(&store, d2, SEG);
    assert!(back[..256 * SECTOR_SIZE] == sectors(256, 10)[..]);
    assert!(back[256 * SECTOR_SIZE..512 * SECTOR_SIZE] == sectors(256, 11)[..]);
    assert!(back[512 * SECTOR_SIZE..].iter().all(|&b| b == 0));
    {
        let db = open_db(Shared::new(&store, -1));
        check_mebibytes(&db, "a", 3);
        check_mebibytes(&db, "b", 12);
        check_mebibytes(&db, "c", 2);
        // More growth and more data after the reopen.
        put_mebibytes(&db, "d", 6);
        let d3 = store.claim_data_segment().unwrap();
        assert!(d3 > d2);
        store.write_data_sectors(d3 + 5, &sectors(3, 30)).unwrap();
        check_mebibytes(&db, "b", 12);
    }
    assert_eq!(store.damaged_reads(), 0);
    store.close().unwrap();
    drop(store);
    let store = unlock(&v.path, Access::ReadOnly);
    assert!(read_data(&store, d1, SEG) == sectors(SEG, 1));
    let db = Database::builder()
        .set_cache_size(64 * 1024)
        .open_read_only_with_backend(store)
        .unwrap();
    check_mebibytes(&db, "d", 6);
    check_mebibytes(&db, "a", 3);
}

#[test]
fn unwritten_data_sectors_read_zeros_and_damaged_ones_are_counted() {
    let v = written_vault(8);
    let d;
    {
        let store = unlock(&v.path, Access::ReadWrite);
        d = store.claim_data_segment().unwrap();
        assert!(read_data(&store, d, SEG).iter().all(|&b| b == 0));
        store.write_data_sectors(d + 100, &sectors(50, 7)).unwrap();
        let back = read_data(&store, d + 90, 70);
        assert!(back[..10 * SECTOR_SIZE].iter().all(|&b| b == 0));
        assert!(back[10 * SECTOR_SIZE..60 * SECTOR_SIZE] == sectors(50, 7)[..]);
        assert!(back[60 * SECTOR_SIZE..].iter().all(|&b| b == 0));
        store.sync_data().unwrap();
        store.abandon(); // no clean close: the rest stays a gap
    }
    let info = Container::inspect(&v.path).unwrap();
    assert!(info.unsealed_sectors >= SEG - 256, "{info:?}");
    xor_byte(&v.path, sector_offset(d + 120) + 300, 0x10);
    let store = unlock(&v.path, Access::ReadOnly);
    let back = read_data(&store, d, 256);
    assert!(back[..100 * SECTOR_SIZE].iter().all(|&b| b == 0));
    assert!(back[100 * SECTOR_SIZE..120 * SECTOR_SIZE] == sectors(50, 7)[..20 * SECTOR_SIZE]);
    assert!(
        back[120 * SECTOR_SIZE..121 * SECTOR_SIZE]
            .iter()
            .all(|&b| b == 0),
        "damaged bytes leaked"
    );
    assert!(back[121 * SECTOR_SIZE..150 * SECTOR_SIZE] == sectors(50, 7)[21 * SECTOR_SIZE..]);
    assert_eq!(store.damaged_reads(), 1);
    assert_eq!(store.damaged_sectors(), vec![d + 120]);
    // Every read counts again; the deep scan lists it.
    read_data(&store, d + 120, 1);
    assert_eq!(store.damaged_reads(), 2);
    let scan = store.scan_sectors(&mut |_, _| {}).unwrap();
    assert_eq!(scan.damaged, vec![d + 120]);
    assert_eq!(scan.checked, d + SEG);
}

#[test]
fn a_claim_is_durable_only_after_a_sync() {
    let v = written_vault(8);
    let before = Container::inspect(&v.path).unwrap();
    let d;
    {
        let store = unlock(&v.path, Access::ReadWrite);
        d = store.claim_data_segment().unwrap();
        store.write_data_sectors(d, &sectors(300, 3)).unwrap();
        store.abandon(); // a crash before any sync
    }
    let info = Container::inspect(&v.path).unwrap();
    assert_eq!((info.version, info.store_segments), (3, None));
    assert_eq!(info.extent_sectors, before.extent_sectors);
    {
        // The segment is free again: the same one is claimed.
        let store = unlock(&v.path, Access::ReadWrite);
        assert_eq!(store.claim_data_segment().unwrap(), d);
        let e = store
            .read_data_sectors(d + SEG, &mut [0u8; 4096])
            .unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EINVAL));
        assert!(read_data(&store, d, 300).iter().all(|&b| b == 0));
        store.write_data_sectors(d, &sectors(300, 4)).unwrap();
        store.sync_data().unwrap();
        store.abandon(); // a crash after the sync
    }
    assert_eq!(store_segments(&v.path), vec![0]);
    {
        // Store growth after the reopen lands after the data segment, and
        // does not overwrite it.
        let store = unlock(&v.path, Access::ReadWrite);
        let far = 3 * SEG * 4096;
        store.set_len(far + 4096).unwrap();
        store.write(far, &pattern(4096, 77)).unwrap();
        store.sync_data().unwrap();
        let segs = store_segments(&v.path);
        assert!(!segs.contains(&(d / SEG)), "{segs:?}");
        assert!(segs[1..].iter().all(|&q| q > d / SEG), "{segs:?}");
        assert!(read_data(&store, d, 300) == sectors(300, 4));
        let next = store.claim_data_segment().unwrap();
        assert!(next > d && !segs.contains(&(next / SEG)));
        store.abandon();
    }
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, 300) == sectors(300, 4));
    let mut page = vec![0u8; 4096];
    store.read(3 * SEG * 4096, &mut page).unwrap();
    assert!(page == pattern(4096, 77));
    assert_eq!(store.damaged_reads(), 0);
}

#[test]
fn data_writes_outside_data_segments_are_refused() {
    let v = written_vault(8);
    let store = unlock(&v.path, Access::ReadWrite);
    let d = store.claim_data_segment().unwrap();
    assert_eq!(d, SEG, "the store had one segment");
    let one = sectors(1, 1);
    for first in [0, 1, 5, SEG - 1, 2 * SEG, 3 * SEG, u64::MAX] {
        let e = store.write_data_sectors(first, &one).unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EINVAL), "{first}");
        let e = store
            .read_data_sectors(first, &mut [0u8; 4096])
            .unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EINVAL), "{first}");
    }
    // A run reaching past the segment, or not whole sectors.
    let e = store
        .write_data_sectors(2 * SEG - 1, &sectors(2, 1))
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINVAL));
    let e = store.write_data_sectors(d, &[0u8; 100]).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINVAL));
    // Store pages written afterwards are not in the data segment.
    store.set_len(SEG * 4096 + 3 * 4096).unwrap();
    store.write(SEG * 4096, &pattern(3 * 4096, 9)).unwrap();
    let e = store.write_data_sectors(2 * SEG, &one).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINVAL));
    store.write_data_sectors(2 * SEG - 1, &one).unwrap();
    drop(store);

    let store = unlock(&v.path, Access::ReadOnly);
    let e = store.claim_data_segment().unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EROFS));
    let e = store.write_data_sectors(d, &one).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EROFS));
    assert!(read_data(&store, 2 * SEG - 1, 1) == one);
}

#[test]
fn a_fixed_size_vault_refuses_a_claim_that_does_not_fit() {
    // 3000 sectors: segments 0 and 1 whole, segment 2 cut short.
    let v = create_vault(Some(file_len_for_sectors(3000)));
    let store = unlock(&v.path, Access::ReadWrite);
    store.write(0, &[0u8; 320]).unwrap();
    store.write(4096, &pattern(4096, 1)).unwrap();
    let d = store.claim_data_segment().unwrap();
    assert_eq!(d, SEG);
    let e = store.claim_data_segment().unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOSPC));
    store.write_data_sectors(d, &sectors(SEG, 2)).unwrap();
    // The store still grows into what is left (segment 2, up to the capacity).
    let last = 3000 - 2 - SEG; // store page in the capacity's last sector
    store.set_len((last + 1) * 4096).unwrap();
    store.write(last * 4096, &pattern(4096, 3)).unwrap();
    let e = store
        .write((last + 1) * 4096, &pattern(4096, 3))
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOSPC));
    store.sync_data().unwrap();
    drop(store);
    let len = std::fs::metadata(&v.path).unwrap().len();
    assert_eq!(
        len,
        file_len_for_sectors(3000),
        "a fixed-size file never grows"
    );
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, SEG) == sectors(SEG, 2));
    let mut page = vec![0u8; 4096];
    store.read(last * 4096, &mut page).unwrap();
    assert!(page == pattern(4096, 3));
    assert_eq!(store.damaged_reads(), 0);
}

#[test]
fn verify_and_the_deep_scan_pass_a_vault_with_data_segments() {
    let v = written_vault(8);
    {
        let store = unlock(&v.path, Access::ReadWrite);
        let d = store.claim_data_segment().unwrap();
        store.write_data_sectors(d + 7, &sectors(600, 5)).unwrap();
        store.set_len(SEG * 4096 + 8 * 4096).unwrap();
        store.write(SEG * 4096, &pattern(8 * 4096, 6)).unwrap();
    }
    let report = verify_container(&v.path).unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let g = report.geometry.unwrap();
    // Up to the store's last page: its page SEG + 7 is store position SEG + 8,
    // in its second segment, physical segment 2.
    assert_eq!(g.extent_sectors, 2 * SEG + 9);
    assert_eq!(g.file_len, g.expected_len);
    let store = unlock(&v.path, Access::ReadOnly);
    let scan = store.scan_sectors(&mut |_, _| {}).unwrap();
    assert_eq!(
        scan,
        SectorScan {
            checked: g.extent_sectors,
            ..SectorScan::default()
        }
    );
}

#[test]
fn shrinking_the_store_keeps_data_segments_and_reads_zeros_after_growth() {
    let v = written_vault(8);
    let d;
    {
        let store = unlock(&v.path, Access::ReadWrite);
        d = store.claim_data_segment().unwrap();
        store.write_data_sectors(d, &sectors(SEG, 8)).unwrap();
        // The store grows past the data segment, then shrinks back (as redb
        // trims its tail at close).
        store.set_len(2 * SEG * 4096).unwrap();
        store.write(SEG * 4096, &pattern(4096, 1)).unwrap();
        store.write(20 * 4096, &pattern(4096, 2)).unwrap();
        store.sync_data().unwrap();
        store.set_len(10 * 4096).unwrap();
        store.set_len(2 * SEG * 4096).unwrap();
        let mut page = vec![9u8; 4096];
        for at in [SEG, 20] {
            store.read(at * 4096, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == 0), "page {at}");
        }
        store.set_len(10 * 4096).unwrap();
    }
    // The file keeps the data segment whole.
    let info = Container::inspect(&v.path).unwrap();
    assert!(info.extent_sectors >= d + SEG, "{info:?}");
    assert!(info.file_len >= file_len_for_sectors(d + SEG));
    assert_eq!(info.unsealed_sectors, 0);
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, SEG) == sectors(SEG, 8));
    store.set_len(2 * SEG * 4096).unwrap();
    let mut page = vec![9u8; 4096];
    store.read(20 * 4096, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0));
    assert_eq!(store.damaged_reads(), 0);
    assert!(verify_container(&v.path).is_ok());
}

#[test]
fn long_data_runs_are_written_past_the_page_cache_and_read_back() {
    let v = written_vault(8);
    let store = unlock(&v.path, Access::ReadWrite);
    let d = store.claim_data_segment().unwrap();
    // Runs of every alignment against 4 KiB pages.
    let mut at = d;
    for (i, n) in [256u64, 33, 200, 1, 255, 40].into_iter().enumerate() {
        store.write_data_sectors(at, &sectors(n, i as u8)).unwrap();
        at += n;
    }
    let direct = store.direct_writes();
    let back = read_data(&store, d, at - d);
    let mut want = Vec::new();
    for (i, n) in [256u64, 33, 200, 1, 255, 40].into_iter().enumerate() {
        want.extend(sectors(n, i as u8));
    }
    assert!(back == want);
    store.sync_data().unwrap();
    drop(store);
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, at - d) == want);
    assert_eq!(store.damaged_reads(), 0);
    // Where the file system allows O_DIRECT, the long runs used it.
    if store.direct_write_available() {
        assert_eq!(direct, 5);
    }
}

#[test]
fn redb_pages_map_to_sectors_through_the_log_and_the_segment_map() {
    // Identity map, no log: page k > 0 is sector k + 1.
    let v = written_vault(8);
    let store = unlock(&v.path, Access::ReadWrite);
    assert_eq!(store.sectors_of_redb_pages(0..3), vec![0, 1, 2, 3]);
    assert_eq!(store.sectors_of_redb_pages(5..7), vec![6, 7]);
    // A data segment, then store growth: redb page SEG - 1 is store position
    // SEG, the first of store segment 1, which is physical segment 2.
    let d = store.claim_data_segment().unwrap();
    assert_eq!(d, SEG);
    store.set_len((SEG + 4) * 4096).unwrap();
    assert_eq!(
        store.sectors_of_redb_pages(SEG - 3..SEG),
        vec![SEG - 2, SEG - 1, 2 * SEG]
    );
    drop(store);
    // Past a log of 256 pages (store pages 1..=256, sectors 2..=257).
    let v = create_vault_with_log();
    let store = unlock(&v.path, Access::ReadWrite);
    assert_eq!(store.sectors_of_redb_pages(0..2), vec![0, 1, 258]);
}

#[test]
fn the_segment_map_refuses_growth_past_its_runs() {
    let v = written_vault(8);
    let store = unlock(&v.path, Access::ReadWrite);
    let mut len = 8 * 4096;
    store.claim_data_segment().unwrap();
    // Each growth past a data segment starts a run of its own.
    let mut grown = 0;
    let err = loop {
        len += SEG * 4096;
        match store.set_len(len) {
            Ok(()) => grown += 1,
            Err(e) => break e,
        }
        store.claim_data_segment().unwrap();
    };
    assert_eq!(grown, MAX_SEGMENT_RUNS - 1);
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    assert!(err.to_string().contains("segment map is full"), "{err}");
    // Data segments can still be claimed; the full map is recorded.
    store.claim_data_segment().unwrap();
    store.sync_data().unwrap();
    store.abandon(); // no clean close: it would seal half a gibibyte of zeros
    drop(store);
    let info = Container::inspect(&v.path).unwrap();
    assert_eq!(info.store_segments.unwrap().len(), MAX_SEGMENT_RUNS);
}

/// Throughput of file data outside redb: 1 GiB in runs of 1 MiB with
/// `write_data_sectors`, a sync, then read back in order after the page cache
/// was dropped for the file, with direct writes and with buffered ones. Run
/// in release mode: `cargo nextest run --release --lib --run-ignored only
/// data_sector_throughput --no-capture` (`KEYBOUND_PERF_MIB` to change 1024).
#[test]
#[ignore = "a measurement, not a check: about 10 s and 2 GiB of disk"]
fn data_sector_throughput() {
    use std::time::Instant;
    let mib: u64 = std::env::var("KEYBOUND_PERF_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let run = 256u64; // sectors: 1 MiB
    let plain = sectors(run, 1);
    let drop_cache = |path: &Path| {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: a valid fd; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    };
    for direct in [true, false] {
        let v = written_vault(8);
        let store = unlock(&v.path, Access::ReadWrite);
        if !direct {
            store.disable_direct_writes();
        }
        let mut firsts = Vec::new();
        let start = Instant::now();
        let mut d = 0;
        for i in 0..mib {
            if i % (SEG / run) == 0 {
                d = store.claim_data_segment().unwrap();
            }
            let first = d + (i % (SEG / run)) * run;
            store.write_data_sectors(first, &plain).unwrap();
            firsts.push(first);
        }
        store.sync_data().unwrap();
        let write = start.elapsed().as_secs_f64();
        let used_direct = store.direct_writes() > 0;
        drop(store);
        let file_mib = std::fs::metadata(&v.path).unwrap().len() as f64 / (1 << 20) as f64;
        // Cold read.
        let f = std::fs::File::open(&v.path).unwrap();
        f.sync_all().unwrap();
        drop_cache(&v.path);
        let store = unlock(&v.path, Access::ReadOnly);
        let mut out = vec![0u8; plain.len()];
        let start = Instant::now();
        for &first in &firsts {
            store.read_data_sectors(first, &mut out).unwrap();
        }
        let read = start.elapsed().as_secs_f64();
        assert!(out == plain);
        assert_eq!(store.damaged_reads(), 0);
        println!(
            "{} writes (used: {used_direct}): {mib} MiB written + synced in {write:.2} s = \
             {:.0} MiB/s; cold read {read:.2} s = {:.0} MiB/s; file {file_mib:.0} MiB",
            if direct { "direct" } else { "buffered" },
            mib as f64 / write,
            mib as f64 / read,
        );
    }
}

/// Removes the values `{prefix}0..{prefix}n`.
fn delete_mebibytes(db: &Database, prefix: &str, n: usize) {
    let mut txn = db.begin_write().unwrap();
    txn.set_two_phase_commit(true);
    {
        let mut t = txn.open_table(TABLE).unwrap();
        for i in 0..n {
            t.remove(format!("{prefix}{i}").as_str()).unwrap();
        }
    }
    txn.commit().unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn a_release_cuts_the_store_segments_past_its_length_at_the_end() {
    let v = create_vault(None);
    let store = Arc::new(unlock(&v.path, Access::ReadWrite));
    let (d1, d2);
    {
        let mut db = open_db(Shared::new(&store, -1));
        put_mebibytes(&db, "a", 2);
        d1 = store.claim_data_segment().unwrap();
        store.write_data_sectors(d1, &sectors(SEG, 1)).unwrap();
        // The store grows past d1, then a data segment after it.
        put_mebibytes(&db, "b", 12);
        d2 = store.claim_data_segment().unwrap();
        store.write_data_sectors(d2, &sectors(8, 2)).unwrap();
        delete_mebibytes(&db, "b", 12);
        while db.compact().unwrap() {}
    }
    // redb trimmed its tail at close; d2 keeps the store's segments below it
    // in the map and the file long.
    let segs = store_segments(&v.path);
    assert!(segs.iter().any(|&q| q > d1 / SEG), "{segs:?}");
    let before = Container::inspect(&v.path).unwrap();
    assert_eq!(before.extent_sectors, d2 + SEG);
    assert_eq!(file_len(&v.path), file_len_for_sectors(d2 + SEG));
    // The store's length needs none of the segments after d1.
    assert!(sectors_for_len(before.store_len) <= d1, "{before:?}");

    // Only d1 is still in use.
    let freed = store.release_unused_segments(&[d1]).unwrap();
    let after = Container::inspect(&v.path).unwrap();
    assert_eq!(after.extent_sectors, d1 + SEG, "{after:?}");
    assert_eq!(store_segments(&v.path), (0..d1 / SEG).collect::<Vec<_>>());
    assert_eq!(file_len(&v.path), file_len_for_sectors(d1 + SEG));
    assert_eq!(freed, file_len_for_sectors(d2 + SEG) - file_len(&v.path));
    assert_eq!(after.unsealed_sectors, 0);
    // Nothing more to give back.
    assert_eq!(store.release_unused_segments(&[d1]).unwrap(), 0);
    // d2 is no data segment any more.
    let e = store.release_unused_segments(&[d1, d2]).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINVAL));
    store.close().unwrap();
    drop(store);
    assert!(verify_container(&v.path).unwrap().findings.is_empty());

    let store = Arc::new(unlock(&v.path, Access::ReadWrite));
    assert!(read_data(&store, d1, SEG) == sectors(SEG, 1));
    {
        let db = open_db(Shared::new(&store, -1));
        check_mebibytes(&db, "a", 2);
        // Growth and claims take the segments given back.
        put_mebibytes(&db, "c", 6);
        let segs = store_segments(&v.path);
        let above: Vec<u64> = segs.iter().copied().filter(|&q| q > d1 / SEG).collect();
        assert_eq!(above.first(), Some(&(d1 / SEG + 1)), "{segs:?}");
        let d = store.claim_data_segment().unwrap();
        assert_eq!(d, (segs.last().unwrap() + 1) * SEG, "{segs:?}");
        check_mebibytes(&db, "c", 6);
    }
    assert_eq!(store.damaged_reads(), 0);
}

#[test]
fn a_release_cuts_the_unlisted_data_segments_at_the_end_only() {
    let v = written_vault(8);
    let d: Vec<u64>;
    {
        let store = unlock(&v.path, Access::ReadWrite);
        d = (0..3)
            .map(|_| store.claim_data_segment().unwrap())
            .collect();
        assert_eq!(d, vec![SEG, 2 * SEG, 3 * SEG]);
        for (i, &first) in d.iter().enumerate() {
            store
                .write_data_sectors(first, &sectors(SEG, i as u8))
                .unwrap();
        }
        store.sync_data().unwrap();
        let long = file_len_for_sectors(4 * SEG);
        assert_eq!(file_len(&v.path), long);
        // The last one is in use: it keeps the file long, and the free ones
        // below it stay where they are.
        assert_eq!(store.release_unused_segments(&[d[2]]).unwrap(), 0);
        assert_eq!(file_len(&v.path), long);
        assert_eq!(Container::inspect(&v.path).unwrap().extent_sectors, 4 * SEG);
        // Not the first sector of a data segment: refused, nothing changes.
        for bad in [0, 5, SEG + 1, 4 * SEG] {
            let e = store.release_unused_segments(&[d[0], bad]).unwrap_err();
            assert_eq!(errno_of(&e), Some(libc::EINVAL), "{bad}");
        }
        assert_eq!(file_len(&v.path), long);
        // Only the first: the two above it go.
        let freed = store.release_unused_segments(&[d[0]]).unwrap();
        assert_eq!(freed, 2 * SEG * SEALED_SECTOR_SIZE as u64);
        assert_eq!(file_len(&v.path), file_len_for_sectors(2 * SEG));
        assert!(read_data(&store, d[0], SEG) == sectors(SEG, 0));
        let e = store.write_data_sectors(d[1], &sectors(1, 9)).unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EINVAL));
    }
    let info = Container::inspect(&v.path).unwrap();
    assert_eq!(info.extent_sectors, 2 * SEG);
    assert_eq!(info.file_len, file_len_for_sectors(2 * SEG));
    assert!(verify_container(&v.path).unwrap().findings.is_empty());
    {
        let store = unlock(&v.path, Access::ReadOnly);
        assert!(read_data(&store, d[0], SEG) == sectors(SEG, 0));
        let e = store.release_unused_segments(&[d[0]]).unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::EROFS));
    }
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d[0], SEG) == sectors(SEG, 0));
    let mut page = vec![0u8; 4096];
    store.read(7 * 4096, &mut page).unwrap();
    assert!(page == pattern(4096, 7));
    // The segment given back is claimed again, and reads as zeros.
    assert_eq!(store.claim_data_segment().unwrap(), d[1]);
    assert!(read_data(&store, d[1], 4).iter().all(|&b| b == 0));
    // Nothing listed: every data segment at the end goes.
    store.release_unused_segments(&[]).unwrap();
    assert_eq!(file_len(&v.path), file_len_for_sectors(9));
    assert_eq!(store.damaged_reads(), 0);
}

#[test]
fn a_release_interrupted_after_its_header_write_opens_and_the_next_one_truncates() {
    let v = written_vault(8);
    let d;
    {
        let store = unlock(&v.path, Access::ReadWrite);
        d = store.claim_data_segment().unwrap();
        store.write_data_sectors(d, &sectors(SEG, 4)).unwrap();
        let d2 = store.claim_data_segment().unwrap();
        store.write_data_sectors(d2, &sectors(10, 5)).unwrap();
        store.sync_data().unwrap();
        let want = store.release_without_truncate(&[d]).unwrap();
        assert_eq!(want, file_len_for_sectors(d + SEG));
        store.abandon(); // a crash before the truncate
    }
    let info = Container::inspect(&v.path).unwrap();
    assert_eq!(info.extent_sectors, d + SEG);
    assert_eq!(info.file_len, file_len_for_sectors(d + 2 * SEG));
    let report = verify_container(&v.path).unwrap();
    assert_eq!(kinds(&report), vec!["beyond-extent"]);
    assert!(!report.damaged());

    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, SEG) == sectors(SEG, 4));
    let freed = store.release_unused_segments(&[d]).unwrap();
    assert_eq!(freed, SEG * SEALED_SECTOR_SIZE as u64);
    assert_eq!(file_len(&v.path), file_len_for_sectors(d + SEG));
    drop(store);
    assert!(verify_container(&v.path).unwrap().findings.is_empty());
    let store = unlock(&v.path, Access::ReadWrite);
    assert!(read_data(&store, d, SEG) == sectors(SEG, 4));
    assert_eq!(store.damaged_reads(), 0);
}

#[test]
fn a_release_changes_nothing_in_a_fixed_size_vault() {
    let v = create_vault(Some(file_len_for_sectors(4 * SEG)));
    let store = unlock(&v.path, Access::ReadWrite);
    store.write(0, &[0u8; 320]).unwrap();
    store.write(4096, &pattern(4096, 1)).unwrap();
    let d = store.claim_data_segment().unwrap();
    store.claim_data_segment().unwrap();
    store.write_data_sectors(d, &sectors(3, 2)).unwrap();
    store.sync_data().unwrap();
    let before = Container::inspect(&v.path).unwrap();
    let raw = std::fs::read(&v.path).unwrap();
    assert_eq!(store.release_unused_segments(&[]).unwrap(), 0);
    assert!(std::fs::read(&v.path).unwrap() == raw, "the file changed");
    let after = Container::inspect(&v.path).unwrap();
    assert_eq!(
        (after.extent_sectors, after.store_segments, after.generation),
        (
            before.extent_sectors,
            before.store_segments,
            before.generation
        )
    );
    assert!(read_data(&store, d, 3) == sectors(3, 2));
}

#[test]
fn a_version_3_vault_still_shrinks_at_close_after_redb_trims_its_tail() {
    let v = create_vault(None);
    {
        let db = open_db(unlock(&v.path, Access::ReadWrite));
        put_mebibytes(&db, "a", 1);
        put_mebibytes(&db, "b", 12);
    }
    let big = file_len(&v.path);
    {
        let mut db = open_db(unlock(&v.path, Access::ReadWrite));
        delete_mebibytes(&db, "b", 12);
        while db.compact().unwrap() {}
    }
    let info = Container::inspect(&v.path).unwrap();
    assert_eq!((info.version, info.store_segments), (3, None));
    assert_eq!(info.extent_sectors, sectors_for_len(info.store_len));
    assert_eq!(info.file_len, file_len_for_sectors(info.extent_sectors));
    assert!(info.file_len < big / 2, "{} of {big}", info.file_len);
    let db = open_db(unlock(&v.path, Access::ReadWrite));
    check_mebibytes(&db, "a", 1);
}

#[test]
fn a_shrink_unmaps_the_store_segments_it_cuts_off_the_end() {
    let v = create_vault(None);
    let store = Arc::new(unlock(&v.path, Access::ReadWrite));
    let d;
    {
        let mut db = open_db(Shared::new(&store, -1));
        put_mebibytes(&db, "a", 1);
        d = store.claim_data_segment().unwrap();
        store.write_data_sectors(d, &sectors(SEG, 6)).unwrap();
        put_mebibytes(&db, "b", 12);
        assert!(store_segments(&v.path).iter().any(|&q| q > d / SEG));
        delete_mebibytes(&db, "b", 12);
        while db.compact().unwrap() {}
    }
    // redb trimmed its tail at close: no data segment follows the store's
    // segments past its length, so they leave the map and the file.
    let info = Container::inspect(&v.path).unwrap();
    assert!(sectors_for_len(info.store_len) <= d, "{info:?}");
    assert_eq!(store_segments(&v.path), (0..d / SEG).collect::<Vec<_>>());
    assert_eq!(info.extent_sectors, d + SEG);
    assert_eq!(info.file_len, file_len_for_sectors(d + SEG));
    // The next claim takes the segment right after d.
    assert_eq!(store.claim_data_segment().unwrap(), d + SEG);
    assert!(read_data(&store, d, SEG) == sectors(SEG, 6));
    store.close().unwrap();
    drop(store);
    let db = open_db(unlock(&v.path, Access::ReadWrite));
    check_mebibytes(&db, "a", 1);
}
