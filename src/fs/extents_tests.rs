//! The filesystem with its file data in data sectors (schema 2): the model tests again, and what
//! copy-on-write of data sectors must guarantee across crashes and fsync-log replays.

use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::{CHUNKS, DATA_SEGMENTS, FREE_RUNS, FREED_RUNS};
use super::testing::PlainFileStorage;
use super::tests::{self as t, T, with_extents};
use super::*;

fn read_all(fs: &mut Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let got = fs.read(ino, out.len() as u64, 1 << 20).unwrap();
        assert!(!got.is_empty());
        out.extend_from_slice(&got);
    }
    out
}

fn mkfile(fs: &mut Fs, name: &str, data: &[u8]) -> u64 {
    let a = fs
        .mknod(ROOT_INO, name.as_bytes(), libc::S_IFREG | 0o644, 0, t::ME)
        .unwrap();
    fs.write(a.ino, 0, data).unwrap();
    a.ino
}

/// Every data sector the tables account for, as (first, count, what): chunks' extents, free
/// and freed runs. Asserts that none overlaps another and that all lie in recorded segments.
fn accounted(fs: &mut Fs) -> Vec<(u64, u64, &'static str)> {
    let seg = fs.storage().data_segment_sectors();
    fs.run(Mode::Read, |_, tx| {
        let Txn::W { txn, .. } = tx else {
            panic!("read-write")
        };
        let mut runs = Vec::new();
        for e in txn.open_table(CHUNKS)?.iter()? {
            let (_, v) = e?;
            let e = extents::Extent::decode(v.value())?;
            runs.push((e.first, e.sectors(), "chunk"));
        }
        for (table, what) in [(FREE_RUNS, "free"), (FREED_RUNS, "freed")] {
            for e in txn.open_table(table)?.iter()? {
                let (k, v) = e?;
                runs.push((k.value(), v.value(), what));
            }
        }
        let segments: Vec<u64> = txn
            .open_table(DATA_SEGMENTS)?
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        runs.sort();
        for w in runs.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "overlap: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
        for r in &runs {
            let outside = extents::segments_of(r.0, r.1, seg).any(|s| !segments.contains(&s));
            assert!(!outside, "{r:?} outside the recorded segments");
        }
        assert_eq!(
            runs.iter().map(|r| r.1).sum::<u64>(),
            segments.len() as u64 * seg,
            "sectors of the segments not all accounted for: {runs:?}"
        );
        Ok(runs)
    })
    .unwrap()
}

#[test]
fn new_filesystems_keep_file_data_in_data_sectors() {
    with_extents(|| {
        let (_t, mut fs) = T::new();
        assert!(fs.sb.extents());
        assert_eq!(fs.chunk(), schema::EXTENT_CHUNK_SIZE);
        let data = t::pattern(1, 300_000);
        let f = mkfile(&mut fs, "f", &data);
        assert_eq!(read_all(&mut fs, f), data);
        let chunks = accounted(&mut fs).iter().filter(|r| r.2 == "chunk").count();
        assert_eq!(chunks, 5, "300,000 bytes are five chunks of 64 KiB");
    });
    // Without data segments, the old schema.
    let (_t, fs) = T::new();
    assert!(!fs.sb.extents());
}

#[test]
fn model_tests_pass_with_data_sectors() {
    with_extents(|| {
        t::root_and_basic_files();
        t::unaligned_writes_match_a_model();
        t::sparse_files_and_truncate();
        t::fallocate_modes();
        t::links_and_unlink_while_open();
        t::persistence_and_crash();
        t::commit_timer_policy();
        t::statfs_is_sane();
        t::fixed_capacity_gives_enospc_not_failure();
    });
}

#[test]
fn fsync_log_tests_pass_with_data_sectors() {
    with_extents(|| {
        t::an_fsync_goes_to_the_log_and_a_crash_keeps_it();
        t::records_replay_in_order_and_deletions_count();
        t::a_torn_record_ends_the_replay();
        t::a_commit_retires_the_records_before_it();
        t::an_orphan_logged_at_fsync_is_purged_after_the_crash();
    });
}

/// The heart of copy-on-write: sectors a transaction stops using are not written again before
/// its commit is durable, so a crash leaves the last commit's data intact.
#[test]
fn a_crash_keeps_the_last_commit_even_after_rewrites_and_new_files() {
    with_extents(|| {
        let (mut t, mut fs) = T::new();
        let old = t::pattern(2, 200_000);
        let a = mkfile(&mut fs, "a", &old);
        fs.commit().unwrap();
        // Rewrite all of it, delete-and-recreate patterns, new files: all uncommitted.
        fs.write(a, 0, &t::pattern(3, 200_000)).unwrap();
        fs.setattr(
            a,
            &SetAttr {
                size: Some(10),
                ..SetAttr::default()
            },
        )
        .unwrap();
        for i in 0..8 {
            mkfile(&mut fs, &format!("new{i}"), &t::pattern(10 + i, 100_000));
        }
        accounted(&mut fs);
        drop(fs);
        let mut fs = t.reopen(false);
        assert_eq!(
            read_all(&mut fs, a),
            old,
            "the committed data was overwritten"
        );
        accounted(&mut fs);
        // After a commit the freed sectors are used again.
        fs.write(a, 0, &t::pattern(4, 200_000)).unwrap();
        fs.commit().unwrap();
        let before: u64 = fs.run(Mode::Read, |_, tx| tx_segments(tx)).unwrap();
        mkfile(&mut fs, "reuse", &t::pattern(5, 200_000));
        fs.commit().unwrap();
        let after: u64 = fs.run(Mode::Read, |_, tx| tx_segments(tx)).unwrap();
        assert_eq!(before, after, "freed sectors were not reused");
        accounted(&mut fs);
        fs.close().unwrap();
    });
}

fn tx_segments(tx: &Txn) -> FsResult<u64> {
    let Txn::W { txn, .. } = tx else {
        panic!("read-write")
    };
    Ok(txn.open_table(DATA_SEGMENTS)?.len()?)
}

/// A replayed fsync puts a chunk at sectors the lost transaction took: the replay must take
/// them out of the free tables, or a later write would overwrite synced data.
#[test]
fn a_replayed_fsync_keeps_its_sectors_from_reuse() {
    with_extents(|| {
        let (mut t, mut fs) = T::with_log(64);
        let a = mkfile(&mut fs, "a", &t::pattern(6, 150_000));
        fs.commit().unwrap();
        let synced = t::pattern(7, 150_000);
        fs.write(a, 0, &synced).unwrap();
        let b = mkfile(&mut fs, "b", &t::pattern(8, 70_000));
        fs.sync().unwrap();
        drop(fs);
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, a), synced);
        accounted(&mut fs);
        // Fill whatever is free: nothing may land on a's or b's sectors.
        for i in 0..6 {
            mkfile(&mut fs, &format!("fill{i}"), &t::pattern(20 + i, 120_000));
            fs.commit().unwrap();
        }
        accounted(&mut fs);
        assert_eq!(read_all(&mut fs, a), synced);
        assert_eq!(read_all(&mut fs, b), t::pattern(8, 70_000));
        let report = fs.check(&mut |_| {}).unwrap();
        assert!(report.is_clean(), "{report:#?}");
        fs.close().unwrap();
    });
}

#[test]
fn a_damaged_data_sector_fails_that_file_only() {
    with_extents(|| {
        let (mut t, mut fs) = T::new();
        let a_data = t::pattern(30, 200_000);
        let b_data = t::pattern(31, 200_000);
        let a = mkfile(&mut fs, "a", &a_data);
        let b = mkfile(&mut fs, "b", &b_data);
        fs.close().unwrap();
        let mut fs = t.reopen(false);
        // The sector holding byte 70,000 of a.
        let first = fs
            .run(Mode::Read, |_, tx| {
                let Txn::W { txn, .. } = tx else {
                    panic!("read-write")
                };
                let table = txn.open_table(CHUNKS)?;
                let v = table.get((a, 1))?.unwrap();
                Ok(extents::Extent::decode(v.value())?.first)
            })
            .unwrap();
        t.storage
            .damage_data_sector(first + (70_000 - 65_536) / 4096);
        let r = fs.read(a, 0, 200_000);
        assert!(matches!(r, Err(ref e) if e.errno() == libc::EIO), "{r:?}");
        assert_eq!(&fs.read(a, 0, 1000).unwrap()[..], &a_data[..1000]);
        assert_eq!(read_all(&mut fs, b), b_data);
        // A write into the damaged chunk is refused; the vault stays writable.
        let w = fs.write(a, 70_000, b"zz");
        assert!(matches!(w, Err(ref e) if e.errno() == libc::EIO), "{w:?}");
        assert!(!fs.is_damaged());
        fs.write(b, 0, b"still writable").unwrap();
        // The check names the file.
        let report = fs.check(&mut |_| {}).unwrap();
        assert!(!report.is_clean());
        assert!(format!("{report:?}").contains("/a"), "{report:#?}");
        fs.close().unwrap();
    });
}

#[test]
fn a_filesystem_of_the_first_schema_stays_so_on_storage_with_data_sectors() {
    let (t, mut fs) = T::new();
    let data = t::pattern(40, 100_000);
    let f = mkfile(&mut fs, "old", &data);
    fs.close().unwrap();
    let storage = PlainFileStorage::open(&t.path)
        .unwrap()
        .with_data_segments(64)
        .unwrap();
    let mut fs = Fs::open(Arc::new(storage), false).unwrap();
    assert!(!fs.sb.extents());
    assert_eq!(read_all(&mut fs, f), data);
    fs.write(f, 5, b"new").unwrap();
    let g = mkfile(&mut fs, "new", &data);
    assert_eq!(read_all(&mut fs, g), data);
    fs.close().unwrap();
}

#[test]
fn a_filesystem_of_the_second_schema_needs_data_sectors() {
    let dir;
    {
        let (t, mut fs) = {
            let mut out = None;
            with_extents(|| out = Some(T::new()));
            out.unwrap()
        };
        mkfile(&mut fs, "f", b"data");
        fs.close().unwrap();
        dir = t;
    }
    let storage = PlainFileStorage::open(&dir.path).unwrap();
    let r = Fs::open(Arc::new(storage), false);
    assert!(
        matches!(&r, Err(FsError::Corrupt(m)) if m.contains("data sectors")),
        "{r:?}"
    );
}

#[test]
fn the_check_finds_a_sector_held_twice() {
    with_extents(|| {
        let (_t, mut fs) = T::new();
        let f = mkfile(&mut fs, "f", &t::pattern(50, 100_000));
        fs.commit().unwrap();
        let report = fs.check(&mut |_| {}).unwrap();
        assert!(report.is_clean(), "{report:#?}");
        // Make the free list claim the file's second chunk.
        fs.run(Mode::Write, |_, tx| {
            let Txn::W { txn, .. } = tx else {
                panic!("read-write")
            };
            let first = {
                let table = txn.open_table(CHUNKS)?;
                let v = table.get((f, 1))?.unwrap();
                extents::Extent::decode(v.value())?.first
            };
            txn.open_table(FREE_RUNS)?.insert(first, 2)?;
            Ok(())
        })
        .unwrap();
        let report = fs.check(&mut |_| {}).unwrap();
        let text = format!("{report:?}");
        assert!(text.contains("held twice"), "{report:#?}");
        assert!(
            text.contains(&format!("chunk 1 of inode {f}")),
            "{report:#?}"
        );
    });
}

/// Appending in small pieces patches the fresh last chunk in place: the bytes are right, and
/// the file takes about as many sectors as it has bytes, not one copy per append.
#[test]
fn small_appends_patch_fresh_chunks_in_place() {
    with_extents(|| {
        let (mut t, mut fs) = T::new();
        let want = t::pattern(60, 300_000);
        let (a, _) = fs.create_file(ROOT_INO, b"log", 0o644, t::ME).unwrap();
        for piece in want.chunks(997) {
            let at = fs.getattr(a.ino).unwrap().size;
            fs.write(a.ino, at, piece).unwrap();
        }
        assert_eq!(read_all(&mut fs, a.ino), want);
        let runs = accounted(&mut fs);
        let held: u64 = runs.iter().filter(|r| r.2 == "chunk").map(|r| r.1).sum();
        assert_eq!(held, 300_000u64.div_ceil(4096), "{runs:?}");
        let segments: u64 = fs.run(Mode::Read, |_, tx| tx_segments(tx)).unwrap();
        assert!(
            segments * 64 < 2 * held,
            "{segments} segments for {held} sectors"
        );
        fs.close().unwrap();
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, a.ino), want);
        fs.close().unwrap();
    });
}

/// An extent the fsync log names is durable: later writes copy it, never patch it in place,
/// and a crash brings back exactly what the fsync saw.
#[test]
fn writes_after_an_fsync_do_not_touch_what_it_made_durable() {
    with_extents(|| {
        let (mut t, mut fs) = T::with_log(64);
        let (a, _) = fs.create_file(ROOT_INO, b"f", 0o644, t::ME).unwrap();
        let synced = t::pattern(61, 10_000);
        fs.write(a.ino, 0, &synced[..5_000]).unwrap();
        fs.write(a.ino, 5_000, &synced[5_000..]).unwrap();
        fs.sync().unwrap();
        // Overwrite the middle and append, without a sync: lost in the crash.
        fs.write(a.ino, 2_000, &[0xEE; 3_000]).unwrap();
        fs.write(a.ino, 10_000, &[0xDD; 3_000]).unwrap();
        drop(fs);
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, a.ino), synced);
        accounted(&mut fs);
        fs.close().unwrap();
    });
}

/// A chunk of the last commit is copied on its first change, then patched in place; a crash
/// keeps the committed bytes.
#[test]
fn a_committed_chunk_is_copied_before_it_is_patched() {
    with_extents(|| {
        let (mut t, mut fs) = T::new();
        let committed = t::pattern(62, 20_000);
        let f = mkfile(&mut fs, "f", &committed);
        fs.commit().unwrap();
        for i in 0..10u64 {
            fs.write(f, 20_000 + i * 1_000, &[i as u8; 1_000]).unwrap();
            fs.write(f, i * 100, &[0xAB; 50]).unwrap();
        }
        drop(fs);
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, f), committed);
        accounted(&mut fs);
        fs.close().unwrap();
    });
}

/// Compaction moves file data down into freed sectors and forgets the data segments left
/// empty at the end; every file reads back, and the tables stay consistent.
#[test]
fn compaction_packs_file_data_and_forgets_empty_trailing_segments() {
    with_extents(|| {
        let (mut t, mut fs) = T::new();
        let first = t::pattern(70, 600_000);
        let kept = t::pattern(71, 30_000);
        let last = t::pattern(72, 400_000);
        mkfile(&mut fs, "first", &first);
        let k = mkfile(&mut fs, "kept", &kept);
        let l = mkfile(&mut fs, "last", &last);
        fs.commit().unwrap();
        fs.unlink(ROOT_INO, b"first").unwrap();
        fs.commit().unwrap();
        let segments = |fs: &mut Fs| fs.run(Mode::Read, |_, tx| tx_segments(tx)).unwrap();
        let top = |fs: &mut Fs| {
            accounted(fs)
                .iter()
                .filter(|r| r.2 == "chunk")
                .map(|r| r.0 + r.1)
                .max()
                .unwrap()
        };
        let (before, top_before) = (segments(&mut fs), top(&mut fs));
        assert!(fs.compact().unwrap(), "nothing moved");
        let (after, top_after) = (segments(&mut fs), top(&mut fs));
        assert!(after < before, "{before} segments before, {after} after");
        assert!(
            top_after <= (30_000u64.div_ceil(4096) + 400_000u64.div_ceil(4096)) + 64,
            "data still reaches sector {top_after} (was {top_before})"
        );
        assert_eq!(read_all(&mut fs, k), kept);
        assert_eq!(read_all(&mut fs, l), last);
        let report = fs.check(&mut |_| {}).unwrap();
        assert!(report.is_clean(), "{report:#?}");
        fs.close().unwrap();
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, l), last);
        // Room is claimed again as needed.
        let again = mkfile(&mut fs, "again", &first);
        assert_eq!(read_all(&mut fs, again), first);
        accounted(&mut fs);
        fs.close().unwrap();
    });
}

/// An fsync-log record carries its chunks' bytes, and the replay writes them again: a crash
/// may leave the record on disk while the data sectors it names are not (writeback order), and
/// the replay must not read whatever those sectors held before.
#[test]
fn a_replay_writes_the_logged_bytes_again() {
    with_extents(|| {
        let (mut t, mut fs) = T::with_log(64);
        let want = t::pattern(80, 9_000);
        let f = mkfile(&mut fs, "synced", &want);
        fs.sync().unwrap();
        drop(fs);
        // The data sectors never reached the disk: overwrite the whole data file.
        let mut p = t.path.clone().into_os_string();
        p.push(".data");
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::write(&p, vec![0x5Au8; len as usize]).unwrap();
        let mut fs = t.reopen(false);
        assert_eq!(read_all(&mut fs, f), want);
        fs.close().unwrap();
    });
}
