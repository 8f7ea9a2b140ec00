//! Checks on the place a vault is mounted: it must exist, be an empty
//! directory and not already be a mount point; and the kernel must offer FUSE.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::SessionError;

/// What is wrong with a mountpoint, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum MountpointError {
    #[error("mountpoint {0} does not exist; create it first (mkdir {0})")]
    Missing(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "mountpoint {0} is not empty; keybound mounts only on an empty directory, so that \
         nothing already there is hidden under the vault"
    )]
    NotEmpty(PathBuf),
    #[error("{path} is already a mount point ({what}); unmount it or choose another directory")]
    InUse { path: PathBuf, what: String },
    #[error("cannot inspect mountpoint {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Check `dir` and return its canonical path.
pub fn check(dir: &Path) -> Result<PathBuf, MountpointError> {
    let path = fs::canonicalize(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => MountpointError::Missing(dir.to_path_buf()),
        _ => MountpointError::Io {
            path: dir.to_path_buf(),
            source: e,
        },
    })?;
    if !path.is_dir() {
        return Err(MountpointError::NotADirectory(path));
    }
    if let Some(entry) = mount_at(&path) {
        let what = if super::daemon::is_keybound_entry(&entry) {
            format!(
                "the keybound vault {}; if its daemon is gone, `keybound unmount {}` cleans it up",
                entry.source,
                path.display()
            )
        } else {
            format!("{} from {}", entry.fstype, entry.source)
        };
        return Err(MountpointError::InUse { what, path });
    }
    let mut entries = fs::read_dir(&path).map_err(|e| MountpointError::Io {
        path: path.clone(),
        source: e,
    })?;
    if entries.next().is_some() {
        return Err(MountpointError::NotEmpty(path));
    }
    Ok(path)
}

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The mount at exactly `path` (canonical), if any; the topmost if stacked.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

/// Every mount this process can see.
pub fn mounts() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| text.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mountpoint = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fstype = right.next()?.to_string();
    let source = unescape(right.next()?);
    Some(MountEntry {
        mountpoint: PathBuf::from(unescape(mountpoint)),
        fstype,
        source,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&crate::fuse::unescape_mountinfo(field)).into_owned()
}

/// The kernel's FUSE device must exist and open; say how to get it if not.
pub fn check_fuse() -> Result<(), SessionError> {
    let path = Path::new("/dev/fuse");
    match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(SessionError::NoFuse {
            detail: match e.kind() {
                io::ErrorKind::NotFound => "/dev/fuse does not exist".to_string(),
                _ => format!("cannot open /dev/fuse: {e}"),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let line = "36 35 98:0 / /mnt/my\\040vault rw,nosuid - fuse.keybound /srv/a\\040b.kb rw";
        let entry = parse_mountinfo_line(line).unwrap();
        assert_eq!(entry.mountpoint, PathBuf::from("/mnt/my vault"));
        assert_eq!(entry.fstype, "fuse.keybound");
        assert_eq!(entry.source, "/srv/a b.kb");
    }

    #[test]
    fn refuses_missing_file_nonempty_and_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(check(&missing), Err(MountpointError::Missing(_))));
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            check(&file),
            Err(MountpointError::NotADirectory(_))
        ));
        // `dir` now holds a file: not empty.
        assert!(matches!(
            check(dir.path()),
            Err(MountpointError::NotEmpty(_))
        ));
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert_eq!(check(&empty).unwrap(), fs::canonicalize(&empty).unwrap());
        // /proc is always a mount point.
        assert!(matches!(
            check(Path::new("/proc")),
            Err(MountpointError::InUse { .. })
        ));
    }
}
