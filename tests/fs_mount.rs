//! The filesystem mounted for real through FUSE, over plain-file storage, exercised with ordinary
//! system calls. Needs root and /dev/fuse; skipped otherwise.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keybound::fs::Fs;
use keybound::fs::testing::PlainFileStorage;
use keybound::fuse::{MountHandle, MountOptions, mount};

struct Setup {
    _dir: tempfile::TempDir,
    container: PathBuf,
    mnt: PathBuf,
}

fn setup() -> Option<Setup> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: needs root and /dev/fuse");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    Some(Setup {
        container: dir.path().join("vault"),
        mnt,
        _dir: dir,
    })
}

fn mount_vault(s: &Setup, create: bool, allow_other: bool) -> MountHandle {
    let fs = if create {
        let storage = Arc::new(PlainFileStorage::create(&s.container).unwrap());
        Fs::create(storage, 0, 0).unwrap()
    } else {
        let storage = Arc::new(PlainFileStorage::open(&s.container).unwrap());
        Fs::open(storage, false).unwrap()
    };
    let opts = MountOptions {
        allow_other,
        fsname: s.container.display().to_string(),
        ..Default::default()
    };
    mount(fs, &s.mnt, &opts).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn get_xattr(p: &Path, name: &str) -> Vec<u8> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let len = unsafe {
        libc::getxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(len >= 0, "getxattr: {}", std::io::Error::last_os_error());
    buf.truncate(len as usize);
    buf
}

/// Writes through a shared mapping, then checks the bytes with read(2).
fn mmap_write(p: &Path, data: &[u8]) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap();
    f.set_len(data.len() as u64).unwrap();
    // SAFETY: mapping a file we own of exactly this length; unmapped before the file closes.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(m, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(data.as_ptr(), m.cast::<u8>(), data.len());
        assert_eq!(libc::msync(m, data.len(), libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(m, data.len()), 0);
    }
    drop(f);
    assert_eq!(fs::read(p).unwrap(), data);
}

fn exercise(m: &Path) {
    let big = pattern(1, 5 << 20);
    fs::write(m.join("big"), &big).unwrap();
    assert_eq!(fs::read(m.join("big")).unwrap(), big);
    // Sparse write and partial overwrite.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("big"))
        .unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    f.seek(SeekFrom::Start(100_000)).unwrap();
    f.write_all(b"middle").unwrap();
    drop(f);
    let got = fs::read(m.join("big")).unwrap();
    assert_eq!(got.len(), (8 << 20) + 4);
    assert_eq!(&got[100_000..100_006], b"middle");
    assert!(got[5 << 20..8 << 20].iter().all(|&b| b == 0));

    fs::create_dir_all(m.join("d/e")).unwrap();
    fs::rename(m.join("big"), m.join("d/e/big2")).unwrap();
    fs::hard_link(m.join("d/e/big2"), m.join("hard")).unwrap();
    assert_eq!(fs::metadata(m.join("hard")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("d/e/big2", m.join("sym")).unwrap();
    assert_eq!(fs::read_link(m.join("sym")).unwrap(), Path::new("d/e/big2"));
    assert_eq!(fs::metadata(m.join("sym")).unwrap().len(), (8 << 20) + 4);
    set_xattr(&m.join("hard"), "user.color", b"blue");
    assert_eq!(get_xattr(&m.join("hard"), "user.color"), b"blue");
    mmap_write(&m.join("mapped"), &pattern(2, 300_000));

    // Unlinked while open: still readable and writable through the descriptor.
    fs::write(m.join("ghost"), b"boo").unwrap();
    let mut g = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("ghost"))
        .unwrap();
    fs::remove_file(m.join("ghost")).unwrap();
    assert!(!m.join("ghost").exists());
    g.seek(SeekFrom::End(0)).unwrap();
    g.write_all(b"!").unwrap();
    g.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    g.read_to_string(&mut s).unwrap();
    assert_eq!(s, "boo!");
    drop(g);

    let mut names: Vec<_> = fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "hard", "mapped", "sym"]);
    assert!(fs::remove_dir(m.join("d")).is_err());
    let st = nix_statvfs(m);
    assert_eq!(st.0, 4096);
    assert!(st.1 > 0);
}

/// (f_bsize, f_blocks) of statvfs.
fn nix_statvfs(p: &Path) -> (u64, u64) {
    // SAFETY: a zeroed statvfs filled in by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cstr(p).as_ptr(), &mut st) }, 0);
    (st.f_bsize, st.f_blocks)
}

#[test]
fn mount_use_unmount_remount() {
    let Some(s) = setup() else { return };
    let h = mount_vault(&s, true, false);
    assert!(h.connection_id().is_some());
    exercise(&s.mnt);
    h.unmount().unwrap();
    assert!(!s.mnt.join("hard").exists());

    let h = mount_vault(&s, false, false);
    let m = &s.mnt;
    let got = fs::read(m.join("d/e/big2")).unwrap();
    assert_eq!(&got[..1000], &pattern(1, 1000)[..]);
    assert_eq!(get_xattr(&m.join("hard"), "user.color"), b"blue");
    assert_eq!(fs::read(m.join("mapped")).unwrap(), pattern(2, 300_000));
    fs::remove_file(m.join("hard")).unwrap();
    fs::remove_dir_all(m.join("d")).unwrap();
    h.unmount().unwrap();
}

#[test]
fn abort_cuts_off_open_files_and_keeps_data() {
    let Some(s) = setup() else { return };
    let h = mount_vault(&s, true, false);
    fs::write(s.mnt.join("f"), b"written before the lock").unwrap();
    let mut open = fs::File::open(s.mnt.join("f")).unwrap();
    let known = h.known_inodes();
    assert!(!known.is_empty());
    let notifier = h.notifier().unwrap();
    for ino in known {
        // The kernel may have dropped some already (ENOENT); it must not hang.
        let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
    }
    h.abort().unwrap();
    let mut buf = Vec::new();
    assert!(open.read_to_end(&mut buf).is_err() || buf.is_empty());
    drop(open);
    let h = mount_vault(&s, false, false);
    assert_eq!(
        fs::read(s.mnt.join("f")).unwrap(),
        b"written before the lock"
    );
    h.unmount().unwrap();
}

#[test]
fn writes_are_durable_within_about_a_second() {
    let Some(s) = setup() else { return };
    let h = mount_vault(&s, true, false);
    fs::write(s.mnt.join("f"), b"durable").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!h.with_fs(|fs| fs.is_dirty()).unwrap());
    h.unmount().unwrap();
}

/// fsx settings: a file of up to 4 MiB (many chunks) and every operation Linux FUSE offers.
const FSX_CONFIG: &str = r#"
flen = 4194304
[opsize]
max = 300000
[weights]
close_open = 2
read = 10
write = 10
mapread = 5
mapwrite = 5
invalidate = 1
truncate = 3
fsync = 1
fdatasync = 1
posix_fallocate = 2
punch_hole = 2
sendfile = 1
posix_fadvise = 1
copy_file_range = 2
"#;

/// Runs `sh -c script` as nobody (uid and gid 65534, no other groups); panics if it fails.
fn as_nobody(script: &str) {
    let status = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
        .expect("running setpriv");
    assert!(status.success(), "as nobody: {script}");
}

fn perm_bits(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// A `security.capability` value (revision 2, CAP_NET_BIND_SERVICE permitted).
const FILE_CAPABILITY: [u8; 20] = [0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn has_capability(p: &Path) -> bool {
    let names = std::process::Command::new("getfattr")
        .args(["-m", "-", "--absolute-names"])
        .arg(p)
        .output();
    match names {
        Ok(out) => String::from_utf8_lossy(&out.stdout).contains("security.capability"),
        // Without getfattr, ask for the attribute itself.
        Err(_) => {
            let n = CString::new("security.capability").unwrap();
            // SAFETY: valid C strings; a null buffer of size 0 asks for the length.
            let len =
                unsafe { libc::getxattr(cstr(p).as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
            len >= 0
        }
    }
}

/// A write, truncate or chown takes set-ID bits and file capabilities away exactly as ext4 does
/// on this kernel (each expected mode was what ext4 left after the same step): the daemon does
/// it, since it tells the kernel it will (FUSE_HANDLE_KILLPRIV_V2).
#[test]
fn writes_truncates_and_chowns_drop_privileges_as_ext4_does() {
    let Some(s) = setup() else { return };
    let m = mount_vault(&s, true, true);
    let f = s.mnt.join("f");
    fs::write(&f, b"a").unwrap();
    let chmod = |mode: u32| fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
    let append_as_root = || {
        let mut h = fs::OpenOptions::new().append(true).open(&f).unwrap();
        h.write_all(b"b").unwrap();
    };
    let truncate_as_root = |len: u64| {
        let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
        h.set_len(len).unwrap();
    };

    // Root holds CAP_FSETID: writes and truncates keep the bits; a chown does not.
    chmod(0o6755);
    append_as_root();
    assert_eq!(perm_bits(&f), 0o6755, "append by root");
    truncate_as_root(10);
    assert_eq!(perm_bits(&f), 0o6755, "truncate by root");
    chown(&f, Some(0), Some(0)).unwrap();
    assert_eq!(perm_bits(&f), 0o755, "chown by root, group-execute set");
    chmod(0o6745);
    chown(&f, Some(1000), None).unwrap();
    assert_eq!(perm_bits(&f), 0o2745, "chown by root, no group-execute");

    // nobody owns the file: set `mode`, run `script` on it as nobody, expect `after`.
    let as_nobody_on_f = |mode: u32, script: &str, after: u32, what: &str| {
        chmod(mode);
        as_nobody(&script.replace("F", &format!("'{}'", f.display())));
        assert_eq!(perm_bits(&f), after, "{what}");
    };
    chown(&f, Some(65534), Some(0)).unwrap();
    as_nobody_on_f(0o6777, "echo y >> F", 0o777, "append by nobody");
    as_nobody_on_f(0o6777, "truncate -s 1 F", 0o777, "truncate by nobody");
    let outside = "append by nobody, outside the file's group";
    as_nobody_on_f(0o2767, "echo z >> F", 0o767, outside);
    chown(&f, Some(65534), Some(65534)).unwrap();
    let inside = "append by nobody, in the file's group";
    as_nobody_on_f(0o2767, "echo z >> F", 0o2767, inside);
    as_nobody_on_f(0o4755, "chgrp nogroup F", 0o755, "chgrp by nobody");
    as_nobody_on_f(0o6755, ": > F", 0o755, "O_TRUNC by nobody");

    // A directory keeps its set-ID bits through a chown.
    let d = s.mnt.join("d");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o6755)).unwrap();
    chown(&d, Some(1000), Some(1000)).unwrap();
    assert_eq!(perm_bits(&d), 0o6755, "chown of a directory");

    // File capabilities go with any write, truncate or chown, root's included.
    set_xattr(&f, "security.capability", &FILE_CAPABILITY);
    assert!(has_capability(&f));
    append_as_root();
    assert!(
        !has_capability(&f),
        "append by root kept security.capability"
    );
    set_xattr(&f, "security.capability", &FILE_CAPABILITY);
    truncate_as_root(1);
    assert!(
        !has_capability(&f),
        "truncate by root kept security.capability"
    );
    set_xattr(&f, "security.capability", &FILE_CAPABILITY);
    chown(&f, Some(0), Some(0)).unwrap();
    assert!(!has_capability(&f), "chown kept security.capability");
    m.unmount().unwrap();
}

fn run_fsx(mnt: &Path, ops: u32, seed: u32) -> Option<std::process::Output> {
    let fsx = Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/fsx");
    if !fsx.exists() {
        eprintln!("skipping: fsx not installed (cargo install fsx)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fsx.toml");
    fs::write(&config, FSX_CONFIG).unwrap();
    let out = std::process::Command::new(&fsx)
        .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-f"])
        .arg(&config)
        .arg("-P")
        .arg(dir.path())
        .arg(mnt.join("fsx.data"))
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn fsx_finds_no_corruption() {
    let Some(s) = setup() else { return };
    let h = mount_vault(&s, true, false);
    if let Some(out) = run_fsx(&s.mnt, 3000, 7) {
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fsx failed:\n{log}");
    }
    h.unmount().unwrap();
}

/// For running external suites by hand: mounts a vault (allow_other) at $KB_MNT and serves
/// until it is unmounted from outside. The vault is $KB_CONTAINER (created if missing) or a
/// fresh one in a temp dir. `KB_MNT=/mnt/x cargo test --test fs_mount serve -- --ignored
/// --nocapture`, then e.g. `pjdfstest -p /mnt/x/t`, then `umount /mnt/x`.
#[test]
#[ignore]
fn serve() {
    let Some(s) = setup() else { return };
    let mnt = PathBuf::from(std::env::var_os("KB_MNT").expect("KB_MNT"));
    let container = std::env::var_os("KB_CONTAINER").map_or(s.container.clone(), PathBuf::from);
    let fs = if container.exists() {
        Fs::open(Arc::new(PlainFileStorage::open(&container).unwrap()), false).unwrap()
    } else {
        Fs::create(
            Arc::new(PlainFileStorage::create(&container).unwrap()),
            0,
            0,
        )
        .unwrap()
    };
    let opts = MountOptions {
        allow_other: true,
        fsname: container.display().to_string(),
        ..Default::default()
    };
    let h = mount(fs, &mnt, &opts).unwrap();
    eprintln!("serving {} on {}", container.display(), mnt.display());
    h.wait().unwrap();
}
