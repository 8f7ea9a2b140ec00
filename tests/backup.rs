//! Backups without a key: `keybound backup` (full, incremental, dated copies)
//! and `keybound snapshot -- CMD` of a mounted or locked vault. Every copy
//! must open, pass `verify --deep` and hold everything fsynced before the
//! backup began. Real pcscd, software card, FUSE mounts, rsync and restic.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vault::{Fixture, assert_fails, assert_ok, content, s, stderr, stdout, tree_digests};
use common::wait_until;

const VAULT_IN_USE: i32 = 22;
const HOLD_BROKEN: i32 = 50;
const BACKUP_MISMATCH: i32 = 52;

fn backup_json(fx: &Fixture, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = fx.run(&all);
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// Mount `container` (a copy) on a fresh directory, run `check` on it, unmount.
fn with_mounted_copy(fx: &Fixture, container: &Path, check: impl FnOnce(&Path)) {
    let mnt = fx.path(&format!(
        "mnt-{}",
        container.file_name().unwrap().to_string_lossy()
    ));
    fs::create_dir_all(&mnt).unwrap();
    let out = fx.run(&[
        "mount",
        s(container),
        s(&mnt),
        "--password-file",
        s(&fx.password),
        "--pin-file",
        s(&fx.pin),
    ]);
    assert_ok(&out);
    check(&mnt);
    assert_ok(&fx.run(&["unmount", s(&mnt)]));
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// A writer that creates and fsyncs files in the mount until stopped; what it
/// fsynced so far, in order.
struct Writer {
    stop: Arc<AtomicBool>,
    synced: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WRITER_FILE: usize = 48 * 1024;

impl Writer {
    fn start(dir: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(Mutex::new(Vec::new()));
        let (st, sy) = (stop.clone(), synced.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !st.load(Ordering::SeqCst) {
                write_synced(&dir.join(format!("w{i}")), &content(i, WRITER_FILE));
                sy.lock().unwrap().push(i);
                i += 1;
            }
        });
        Writer {
            stop,
            synced,
            thread: Some(thread),
        }
    }

    fn synced_so_far(&self) -> Vec<u64> {
        self.synced.lock().unwrap().clone()
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.synced_so_far()
    }
}

#[test]
fn backups_of_a_mounted_vault_under_fsync_load_open_and_keep_what_was_fsynced() {
    let fx = Fixture::create_and_mount(20_600_001, &[]);
    fs::create_dir(fx.mnt.join("w")).unwrap();
    let writer = Writer::start(fx.mnt.join("w"));
    wait_until("the writer to fsync", Duration::from_secs(30), || {
        writer.synced_so_far().len() > 10
    });
    let mut copies = Vec::new();
    for k in 0..3 {
        let before = writer.synced_so_far();
        let copy = fx.path(&format!("copy{k}.kb"));
        let report = backup_json(&fx, &[s(&fx.vault), s(&copy)]);
        assert_eq!(report["mounted"], true, "{report}");
        assert_eq!(
            report["bytes"],
            fs::metadata(&copy).unwrap().len(),
            "{report}"
        );
        copies.push((copy, before));
        std::thread::sleep(Duration::from_millis(300));
    }
    let written = writer.stop();
    assert!(
        written.len() > copies[2].1.len(),
        "the writer was held up for good"
    );
    assert_ok(&fx.unmount());

    for (copy, before) in &copies {
        let out = fx.verify_deep(copy, &[]);
        assert_ok(&out);
        with_mounted_copy(&fx, copy, |mnt| {
            for i in before {
                let got = fs::read(mnt.join(format!("w/w{i}"))).unwrap_or_else(|e| {
                    panic!("w{i}, fsynced before the backup, in {copy:?}: {e}")
                });
                assert!(got == content(*i, WRITER_FILE), "w{i} differs in {copy:?}");
            }
        });
    }
}

#[test]
fn a_backup_of_a_busy_vault_seals_its_free_space_before_the_copy() {
    let fx = Fixture::create_and_mount(20_600_008, &[]);
    // The writer keeps the mount busy, so its idle time seals nothing; the big
    // file grows the store, which leaves gaps the header lists as unsealed.
    let writer = Writer::start(fx.mnt.clone());
    write_synced(&fx.mnt.join("big"), &content(1, 48 << 20));
    let before = fx.unsealed_sectors(&fx.vault);
    assert!(before > 0, "a growing store left no gap to seal");
    let copy = fx.path("copy.kb");
    backup_json(&fx, &[s(&fx.vault), s(&copy)]);
    let synced = writer.stop();
    assert_eq!(
        fx.unsealed_sectors(&copy),
        0,
        "the copy shows free space as zeros ({before} sectors unsealed before the backup)"
    );
    assert_ok(&fx.verify_deep(&copy, &[]));
    with_mounted_copy(&fx, &copy, |mnt| {
        assert!(fs::read(mnt.join("big")).unwrap() == content(1, 48 << 20));
        assert!(mnt.join(format!("w{}", synced[0])).exists());
    });
}

#[test]
fn an_incremental_backup_writes_about_the_change_and_equals_a_full_copy() {
    let fx = Fixture::create_and_mount(20_600_002, &[]);
    const MIB: usize = 1 << 20;
    for i in 0..24 {
        write_synced(&fx.mnt.join(format!("f{i}")), &content(i, MIB));
    }
    let copy = fx.path("copy.kb");
    let first = backup_json(&fx, &[s(&fx.vault), s(&copy)]);
    assert_eq!(first["incremental"], false);

    // Change one 1 MiB file, then update the copy while the vault stays mounted.
    write_synced(&fx.mnt.join("f7"), &content(1007, MIB));
    let update = backup_json(&fx, &["--incremental", s(&fx.vault), s(&copy)]);
    let written = update["bytes_written"].as_u64().unwrap();
    let size = update["bytes"].as_u64().unwrap();
    println!("incremental: {written} of {size} bytes written for a 1 MiB change");
    assert!(
        written >= MIB as u64,
        "the change itself was not written: {update}"
    );
    assert!(
        written <= 8 * MIB as u64,
        "an incremental backup of a 1 MiB change wrote {written} bytes of {size}"
    );

    // Quiesced, an incremental update and a full copy are the same bytes.
    let expected = tree_digests(&fx.mnt);
    assert_ok(&fx.unmount());
    backup_json(&fx, &["--incremental", s(&fx.vault), s(&copy)]);
    let full = fx.path("full.kb");
    backup_json(&fx, &[s(&fx.vault), s(&full)]);
    assert!(
        fs::read(&copy).unwrap() == fs::read(&full).unwrap(),
        "incremental and full copies of a quiet vault differ"
    );
    assert!(
        !fx.path("copy.kb.partial").exists(),
        "the incomplete-copy marker stayed"
    );
    assert_ok(&fx.verify_deep(&copy, &[]));
    with_mounted_copy(&fx, &copy, |mnt| assert_eq!(tree_digests(mnt), expected));
}

#[test]
fn rsync_and_restic_under_snapshot_restore_a_vault_that_mounts() {
    let fx = Fixture::create_and_mount(20_600_003, &[]);
    fs::create_dir_all(fx.mnt.join("docs/deep")).unwrap();
    for i in 0..40 {
        write_synced(
            &fx.mnt.join(format!("docs/deep/n{i}")),
            &content(i, 10_000 + i as usize * 331),
        );
    }
    write_synced(&fx.mnt.join("big"), &content(99, 3 << 20));
    let expected = tree_digests(&fx.mnt);

    // rsync of the mounted vault's container, held still while it runs.
    let synced = fx.path("rsynced");
    fs::create_dir(&synced).unwrap();
    let out = fx.run(&[
        "snapshot",
        s(&fx.vault),
        "--",
        "rsync",
        "-a",
        s(&fx.vault),
        s(&synced),
    ]);
    assert_ok(&out);

    // restic: back up the container (held still) into a repository.
    let repo = fx.path("restic-repo");
    let pw = fx.secret("restic-pw", "restic test repository");
    let with_repo = |mut cmd: Command| -> Output {
        cmd.env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD_FILE", &pw)
            .env("RESTIC_CACHE_DIR", fx.path("restic-cache"))
            .stdin(Stdio::null())
            .output()
            .expect("run restic")
    };
    let run_restic = |args: &[&str]| {
        let mut cmd = Command::new("restic");
        cmd.args(args);
        with_repo(cmd)
    };
    assert_ok(&run_restic(&["init", "-q"]));
    let out = with_repo(fx.command(&[
        "snapshot",
        s(&fx.vault),
        "--",
        "restic",
        "-q",
        "backup",
        s(&fx.vault),
    ]));
    assert_ok(&out);
    assert_ok(&fx.unmount());

    // Restore each elsewhere and mount the restored copy.
    let restored = fx.path("restored");
    assert_ok(&run_restic(&[
        "restore",
        "-q",
        "latest",
        "--target",
        s(&restored),
    ]));
    let from_restic = restored.join(fx.vault.strip_prefix("/").unwrap());
    let from_rsync = synced.join("vault.kb");
    for copy in [&from_rsync, &from_restic] {
        let moved = fx.path(&format!(
            "{}.kb",
            if copy == &from_rsync {
                "back-rsync"
            } else {
                "back-restic"
            }
        ));
        fs::rename(copy, &moved).unwrap();
        assert_ok(&fx.verify_deep(&moved, &[]));
        with_mounted_copy(&fx, &moved, |mnt| assert_eq!(tree_digests(mnt), expected));
    }
}

#[test]
fn dated_copies_of_a_locked_vault_are_kept_n_deep_and_hold_off_a_mount() {
    let fx = Fixture::new(20_600_004);
    assert_ok(&fx.create(&[]));
    let dir = fx.path("backups");
    fs::create_dir(&dir).unwrap();
    let mut made = Vec::new();
    for _ in 0..3 {
        let report = backup_json(&fx, &["--keep", "2", s(&fx.vault), s(&dir)]);
        assert_eq!(report["mounted"], false);
        made.push(PathBuf::from(report["copy"].as_str().unwrap()));
    }
    let mut left: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(
        left,
        made[1..].to_vec(),
        "--keep 2 should keep the two newest"
    );
    let name = made[0].file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("vault-") && name.ends_with(".kb"),
        "{name}"
    );
    for copy in &left {
        assert!(fs::read(copy).unwrap() == fs::read(&fx.vault).unwrap());
    }

    // While a snapshot holds a locked vault, it cannot be mounted.
    let mount = format!(
        "{} mount {} {} --password-file {} --pin-file {}",
        common::KEYBOUND_BIN,
        s(&fx.vault),
        s(&fx.mnt),
        s(&fx.password),
        s(&fx.pin)
    );
    let out = fx.run(&["snapshot", s(&fx.vault), "--", "sh", "-c", &mount]);
    assert_fails(&out, VAULT_IN_USE, &["in use", "process"]);
    assert!(!fx.is_mounted());
}

/// `keybound snapshot VAULT -- sh -c 'sleep SECS'` in its own process group
/// (stderr piped), returned once the command runs, i.e. the vault is held.
fn snapshot_holding(fx: &Fixture, secs: u32) -> std::process::Child {
    let held = fx.path("held");
    let _ = fs::remove_file(&held);
    let child = fx
        .command(&[
            "snapshot",
            s(&fx.vault),
            "--",
            "sh",
            "-c",
            &format!("touch {}; exec sleep {secs}", s(&held)),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_until("the snapshot to hold", Duration::from_secs(20), || {
        held.exists()
    });
    child
}

#[test]
fn a_hold_stalls_fsync_until_its_backup_ends_even_when_killed() {
    let fx = Fixture::create_and_mount(20_600_005, &[]);
    let mut snapshot = snapshot_holding(&fx, 60);
    let before = fs::read(&fx.vault).unwrap();

    let target = fx.mnt.join("during");
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let writer = std::thread::spawn(move || {
        write_synced(&target, b"written during a hold");
        d.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !done.load(Ordering::SeqCst),
        "fsync returned while a backup held the vault"
    );
    assert!(
        fs::read(&fx.vault).unwrap() == before,
        "the container changed under a hold"
    );

    // The backup dies without releasing: the daemon notices and lets go.
    // SAFETY: signalling the process group we made for the snapshot and its command.
    unsafe { libc::kill(-(snapshot.id() as i32), libc::SIGKILL) };
    let _ = snapshot.wait();
    let started = Instant::now();
    writer.join().unwrap();
    println!(
        "fsync finished {:?} after the backup died",
        started.elapsed()
    );
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(
        fs::read(fx.mnt.join("during")).unwrap(),
        b"written during a hold"
    );
}

#[test]
fn pulling_the_token_during_a_hold_locks_at_once_and_the_snapshot_says_so() {
    let mut fx = Fixture::create_and_mount(20_600_006, &[]);
    write_synced(&fx.mnt.join("kept"), b"fsynced before the pull");
    let snapshot = snapshot_holding(&fx, 4);
    let pulled = Instant::now();
    fx.card().pull();
    wait_until("the vault to lock", Duration::from_secs(5), || {
        !fx.is_mounted()
    });
    println!(
        "locked {:?} after the pull, during a hold",
        pulled.elapsed()
    );
    let out = snapshot.wait_with_output().unwrap();
    assert_fails(&out, HOLD_BROKEN, &["locked while", "run it again"]);
    fx.card().reinsert();
    assert_ok(&fx.mount(&[]));
    assert_eq!(
        fs::read(fx.mnt.join("kept")).unwrap(),
        b"fsynced before the pull"
    );
}

#[test]
fn backups_refuse_what_would_lose_data() {
    let fx = Fixture::new(20_600_007);
    assert_ok(&fx.create(&[]));
    let digest = fx.vault_digest();
    // Onto the vault itself.
    let out = fx.run(&["backup", s(&fx.vault), s(&fx.vault)]);
    assert_fails(&out, 2, &["is the vault itself"]);
    // An incremental update of something that is not this vault's copy.
    let other = fx.path("other.kb");
    fs::write(&other, b"precious data, not a vault").unwrap();
    let out = fx.run(&["backup", "--incremental", s(&fx.vault), s(&other)]);
    assert_fails(&out, BACKUP_MISMATCH, &["other.kb", "full backup"]);
    assert_eq!(fs::read(&other).unwrap(), b"precious data, not a vault");
    // Nothing to update yet.
    let out = fx.run(&[
        "backup",
        "--incremental",
        s(&fx.vault),
        s(&fx.path("none.kb")),
    ]);
    assert_fails(&out, BACKUP_MISMATCH, &["none.kb"]);
    // --keep with a file.
    let out = fx.run(&["backup", "--keep", "3", s(&fx.vault), s(&fx.path("c.kb"))]);
    assert_fails(&out, 2, &["--keep needs a directory"]);
    assert!(!fx.path("c.kb").exists());
    // Not a vault.
    let out = fx.run(&["backup", s(&other), s(&fx.path("d.kb"))]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(!fx.path("d.kb").exists());
    assert_eq!(fx.vault_digest(), digest);
}
