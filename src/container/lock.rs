//! One process at a time: an exclusive `flock` on the container file, held
//! for as long as the open file is (it goes with the file descriptor into the
//! sector store). Two mounts of one vault would each believe they own the
//! header and the sectors, and corrupt both.
//!
//! `flock` locks belong to the open file description, so a second open in the
//! same process conflicts too. When the lock is taken, `/proc/locks` tells us
//! by whom, so the CLI can name the process.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::error::ContainerError;

/// Take the exclusive lock without waiting.
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<(), ContainerError> {
    try_flock(file, path, libc::LOCK_EX)
}

/// Take a shared lock without waiting: no mount or admin command (they lock
/// exclusively) can start while it is held, so the file holds still for a
/// copy. Several shared holders may coexist.
pub fn lock_shared(file: &File, path: &Path) -> Result<(), ContainerError> {
    try_flock(file, path, libc::LOCK_SH)
}

fn try_flock(file: &File, path: &Path, kind: libc::c_int) -> Result<(), ContainerError> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(ContainerError::Locked {
                    path: path.to_path_buf(),
                    holder: holder_pid(file),
                });
            }
            _ => return Err(ContainerError::io(path, "lock", err)),
        }
    }
}

/// The pid holding a `flock` on `file`, from `/proc/locks` (matched by
/// device and inode). `None` if it cannot be told.
pub(crate) fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    find_holder(&locks, meta.dev(), meta.ino())
}

/// Parse `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF`; lines of waiters
/// (`1: -> FLOCK ...`) are skipped.
fn find_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid = fields.get(4)?.parse::<u32>().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u64::from_str_radix(id.next()?, 16).ok()?;
        let min = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode = id.next()?.parse::<u64>().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let dev = libc::makedev(0xfd, 0x01);
        let text = "1: POSIX  ADVISORY  WRITE 10 fd:01:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 fd:01:1234567 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 55 08:01:1234567 0 EOF\n";
        assert_eq!(find_holder(text, dev, 1234567), Some(4242));
        assert_eq!(find_holder(text, dev, 99), None);
        assert_eq!(find_holder(text, libc::makedev(8, 1), 1234567), Some(55));
        assert_eq!(find_holder("garbage\n: :\n", dev, 1), None);
    }

    #[test]
    fn second_lock_names_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let a = File::open(&path).unwrap();
        lock_exclusive(&a, &path).unwrap();
        let b = File::open(&path).unwrap();
        match lock_exclusive(&b, &path) {
            Err(ContainerError::Locked { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(a);
        lock_exclusive(&b, &path).unwrap();
    }
}
