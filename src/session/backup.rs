//! Consistent copies of a vault's container, mounted or not, without a key.
//!
//! A copy is consistent when the file held still while it was read. A locked
//! vault is held with a shared `flock` (no mount or admin command can start
//! meanwhile); a mounted one by asking its daemon, over the control socket, to
//! commit and close its freeze gate (see [`crate::container::FreezeGate`]).
//! Either way the copy is what a crash at that moment would leave, which the
//! vault opens.
//!
//! If the vault locks while held (its token was pulled), the daemon must write
//! to lock and the copy may be torn: the hold reports it broken, and the copy
//! is taken again from the now locked vault. A full copy is written beside the
//! destination and renamed into place only when the hold held, so a torn copy
//! never takes a good one's name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::control::{ControlError, DaemonHold};
use super::registry;
use crate::audit::Utc;
use crate::container::{
    Container, ContainerError, SECTOR_SIZE, Severity, Thawed, lock_shared, partial_marker,
    verify_container,
};

/// Why a backup or a hold failed. Messages name the files and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{} is mounted (daemon {pid}) but its daemon cannot hold it still for a copy: {source}",
        vault.display()
    )]
    Control {
        vault: PathBuf,
        pid: u32,
        source: ControlError,
    },
    #[error(
        "{} is in use by process {}, which is not a mount this user can reach (a rekey or \
         another admin command, or another user's mount): wait for it to finish, or run the \
         backup as the user who mounted it",
        vault.display(), holder.map_or("?".to_string(), |p| p.to_string())
    )]
    Busy { vault: PathBuf, holder: Option<u32> },
    #[error(
        "the copy written for {} does not open ({why}); it was not kept. Check the vault \
         with `keybound verify` and the disk holding the copy",
        copy.display()
    )]
    CopyUnusable { copy: PathBuf, why: String },
    #[error("the destination {} is the vault itself", dest.display())]
    SameFile { dest: PathBuf },
    #[error(
        "--incremental updates an existing copy in place: {} must be a copy of the vault (a \
         file); make a first full backup without --incremental",
        dest.display()
    )]
    NoCopyToUpdate { dest: PathBuf },
    #[error(
        "{} is not a copy of {} (container id {dest_id}, the vault's is {vault_id}); refusing \
         to overwrite it",
        dest.display(), vault.display()
    )]
    NotACopy {
        dest: PathBuf,
        vault: PathBuf,
        dest_id: String,
        vault_id: String,
    },
    #[error("--keep needs a directory of dated copies as the destination, not {}", dest.display())]
    KeepNeedsDirectory { dest: PathBuf },
    #[error(
        "{} locked twice while it was being copied; the copy may be torn and was not kept: \
         run the backup again",
        vault.display()
    )]
    HoldBroken { vault: PathBuf },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError + use<> {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

/// How long to keep trying while the vault is between states (a mount
/// starting, a daemon ending).
const SETTLE: Duration = Duration::from_secs(10);

/// The vault's container file, held still.
#[derive(Debug)]
pub enum Hold {
    /// Mounted: its daemon committed and holds every write back.
    Daemon { hold: DaemonHold, pid: u32 },
    /// Not mounted: a shared lock keeps mounts and admin commands out.
    Locked { _file: File },
}

impl Hold {
    /// Hold `vault` still, mounted or not.
    pub fn take(vault: &Path) -> Result<Hold, BackupError> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let outcome = Self::try_take(vault);
            match outcome {
                Ok(hold) => return Ok(hold),
                Err(e) if Instant::now() >= deadline || !Self::settling(&e) => return Err(e),
                Err(e) => tracing::debug!("retrying the hold: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_take(vault: &Path) -> Result<Hold, BackupError> {
        if let Some(record) = registry::find_by_container(vault) {
            let socket = registry::control_socket(record.pid);
            return DaemonHold::take(&socket)
                .map(|hold| Hold::Daemon {
                    hold,
                    pid: record.pid,
                })
                .map_err(|source| BackupError::Control {
                    vault: vault.to_path_buf(),
                    pid: record.pid,
                    source,
                });
        }
        let file = File::open(vault).map_err(io_err("open", vault))?;
        match lock_shared(&file, vault) {
            Ok(()) => Ok(Hold::Locked { _file: file }),
            Err(ContainerError::Locked { holder, .. }) => Err(BackupError::Busy {
                vault: vault.to_path_buf(),
                holder,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Errors that pass on their own: a mount registering, a daemon locking.
    fn settling(e: &BackupError) -> bool {
        match e {
            BackupError::Busy { .. } => true,
            BackupError::Control { pid, .. } => registry::process_alive(*pid),
            _ => false,
        }
    }

    /// Whether the vault was mounted when held.
    pub fn mounted(&self) -> bool {
        matches!(self, Hold::Daemon { .. })
    }

    /// Let the vault go; `Broken` if it began locking meanwhile.
    pub fn release(self) -> Thawed {
        match self {
            Hold::Daemon { hold, pid } => {
                let thawed = hold.release();
                tracing::debug!(pid, ?thawed, "hold released");
                thawed
            }
            Hold::Locked { .. } => Thawed::Intact,
        }
    }
}

/// What to make.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Update an existing copy in place, writing only sectors that differ.
    pub incremental: bool,
    /// With a directory destination: keep only the newest N dated copies.
    pub keep: Option<usize>,
}

/// What a backup did; never a secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub vault: PathBuf,
    /// The copy written.
    pub copy: PathBuf,
    pub incremental: bool,
    /// The vault was mounted (held through its daemon).
    pub mounted: bool,
    /// The container's size.
    pub bytes: u64,
    /// Bytes written to the copy (the whole size for a full copy).
    pub bytes_written: u64,
    /// How long the vault was held still, in the successful attempt.
    pub held_ms: u64,
    pub seconds: f64,
    /// The vault locked during a first attempt, so the copy was taken again.
    pub retried: bool,
    /// Older dated copies removed by `--keep`.
    pub pruned: Vec<PathBuf>,
    /// Damage the keyless check found in the copy that does not stop it from
    /// opening (e.g. one header copy); the vault itself has it too.
    pub warnings: Vec<String>,
}

/// Copy `vault` to `dest` (a file, or a directory of dated copies).
/// `progress(done, total)` is called as bytes are copied.
pub fn backup(
    vault: &Path,
    dest: &Path,
    options: &BackupOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let header = Container::inspect(vault)?;
    let target = Target::resolve(vault, dest, options)?;
    if options.incremental {
        check_is_copy(vault, &header.id, &target.copy)?;
    }
    let mut retried = false;
    for _attempt in 0..2 {
        let hold = Hold::take(vault)?;
        let mounted = hold.mounted();
        let held = Instant::now();
        let copied = target.write(vault, options.incremental, progress);
        let held_ms = held.elapsed().as_millis() as u64;
        let thawed = hold.release();
        let (bytes, bytes_written) = copied?;
        if thawed == Thawed::Broken {
            tracing::warn!(vault = %vault.display(), "the vault locked during the copy; copying again");
            target.discard();
            retried = true;
            continue;
        }
        let warnings = check_copy(&target, &header.id)?;
        target.commit()?;
        let pruned = match options.keep {
            Some(keep) => target.prune(keep)?,
            None => Vec::new(),
        };
        return Ok(BackupReport {
            vault: vault.to_path_buf(),
            copy: target.copy.clone(),
            incremental: options.incremental,
            mounted,
            bytes,
            bytes_written,
            held_ms,
            seconds: started.elapsed().as_secs_f64(),
            retried,
            pruned,
            warnings,
        });
    }
    Err(BackupError::HoldBroken {
        vault: vault.to_path_buf(),
    })
}

/// The keyless check of what was written, before it takes the copy's name:
/// it must open as this vault (headers, geometry, size). Other damage is
/// passed on as warnings: it came from the vault.
fn check_copy(target: &Target, id: &[u8]) -> Result<Vec<String>, BackupError> {
    let written = target.written();
    let report = verify_container(written)?;
    let ours = report.container_id.as_deref() == Some(hex::encode(id).as_str());
    if !report.unlockable() || !ours {
        let why = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Damage)
            .map(|f| f.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(BackupError::CopyUnusable {
            copy: target.copy.clone(),
            why: if why.is_empty() {
                "another vault's header".into()
            } else {
                why
            },
        });
    }
    Ok(report
        .findings
        .into_iter()
        .filter(|f| f.severity == Severity::Damage && f.kind != "incomplete-copy")
        .map(|f| f.message)
        .collect())
}

/// Refuse to update in place anything but a copy of this vault. A copy left
/// incomplete by an interrupted update (its marker is there) may not parse
/// any more; it is ours to finish.
fn check_is_copy(vault: &Path, id: &[u8], copy: &Path) -> Result<(), BackupError> {
    if !copy.is_file() {
        return Err(BackupError::NoCopyToUpdate {
            dest: copy.to_path_buf(),
        });
    }
    if partial_marker(copy).exists() {
        return Ok(());
    }
    let header = Container::inspect(copy).map_err(|_| BackupError::NoCopyToUpdate {
        dest: copy.to_path_buf(),
    })?;
    if header.id[..] != id[..] {
        return Err(BackupError::NotACopy {
            dest: copy.to_path_buf(),
            vault: vault.to_path_buf(),
            dest_id: hex::encode(header.id),
            vault_id: hex::encode(id),
        });
    }
    Ok(())
}

/// Where a backup writes.
struct Target {
    /// The copy's final name.
    copy: PathBuf,
    /// A full copy is written here, then renamed to `copy`.
    temp: PathBuf,
    /// For `--keep`: the directory and the name prefix of dated copies.
    dated: Option<(PathBuf, String, String)>,
}

impl Target {
    fn resolve(vault: &Path, dest: &Path, options: &BackupOptions) -> Result<Target, BackupError> {
        let (copy, dated) = if dest.is_dir() {
            if options.incremental {
                return Err(BackupError::NoCopyToUpdate {
                    dest: dest.to_path_buf(),
                });
            }
            let stem = vault
                .file_stem()
                .map_or("vault".into(), |s| s.to_string_lossy().into_owned());
            let ext = vault
                .extension()
                .map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
            let copy = dated_name(dest, &stem, &ext);
            (copy, Some((dest.to_path_buf(), format!("{stem}-"), ext)))
        } else {
            if options.keep.is_some() {
                return Err(BackupError::KeepNeedsDirectory {
                    dest: dest.to_path_buf(),
                });
            }
            (dest.to_path_buf(), None)
        };
        if same_file(vault, &copy) {
            return Err(BackupError::SameFile { dest: copy });
        }
        let name = copy
            .file_name()
            .map_or("copy".into(), |n| n.to_string_lossy().into_owned());
        let temp = copy.with_file_name(format!(".{name}.keybound-{}", std::process::id()));
        Ok(Target { copy, temp, dated })
    }

    /// Copy the held vault; returns (container size, bytes written).
    fn write(
        &self,
        vault: &Path,
        incremental: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(u64, u64), BackupError> {
        let src = File::open(vault).map_err(io_err("open", vault))?;
        let len = src.metadata().map_err(io_err("stat", vault))?.len();
        if incremental {
            let marker = partial_marker(&self.copy);
            File::create(&marker)
                .and_then(|f| f.sync_all())
                .map_err(io_err("create", &marker))?;
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.copy)
                .map_err(io_err("open", &self.copy))?;
            let written =
                update_in_place(&src, &dst, len, progress).map_err(io_err("update", &self.copy))?;
            dst.sync_all().map_err(io_err("sync", &self.copy))?;
            return Ok((len, written));
        }
        let dst = File::create(&self.temp).map_err(io_err("create", &self.temp))?;
        let written = copy_all(&src, &dst, len, progress).map_err(io_err("write", &self.temp))?;
        dst.sync_all().map_err(io_err("sync", &self.temp))?;
        Ok((len, written))
    }

    /// The file this attempt wrote: the temporary copy, or the copy updated in place.
    fn written(&self) -> &Path {
        if self.temp.exists() {
            &self.temp
        } else {
            &self.copy
        }
    }

    /// Forget a torn attempt.
    fn discard(&self) {
        let _ = std::fs::remove_file(&self.temp);
    }

    /// Put the copy in place (full: rename; incremental: drop the marker) durably.
    fn commit(&self) -> Result<(), BackupError> {
        if self.temp.exists() {
            std::fs::rename(&self.temp, &self.copy).map_err(io_err("rename into", &self.copy))?;
        } else {
            let marker = partial_marker(&self.copy);
            std::fs::remove_file(&marker).map_err(io_err("remove", &marker))?;
        }
        sync_dir(&self.copy)
    }

    /// Remove dated copies beyond the newest `keep`.
    fn prune(&self, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
        let Some((dir, prefix, ext)) = &self.dated else {
            return Ok(Vec::new());
        };
        let mut copies: Vec<((String, u32), PathBuf)> = std::fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| Some((dated_copy_key(&p, prefix, ext)?, p)))
            .collect();
        copies.sort();
        let excess = copies.len().saturating_sub(keep.max(1));
        let old: Vec<PathBuf> = copies.into_iter().take(excess).map(|(_, p)| p).collect();
        for path in &old {
            std::fs::remove_file(path).map_err(io_err("remove", path))?;
        }
        if !old.is_empty() {
            sync_dir(&self.copy)?;
        }
        Ok(old)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // A failed or abandoned full copy leaves nothing behind.
        let _ = std::fs::remove_file(&self.temp);
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn sync_dir(file: &Path) -> Result<(), BackupError> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// `DIR/STEM-YYYYMMDDTHHMMSSZ.EXT`, with `-2`, `-3`… if that is taken.
fn dated_name(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let stamp = utc_stamp(registry::now());
    let first = dir.join(format!("{stem}-{stamp}{ext}"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|n| dir.join(format!("{stem}-{stamp}-{n}{ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// When a dated copy was made, as a sort key: its stamp and its `-N` (1 for
/// none). `None` for any other file.
fn dated_copy_key(path: &Path, prefix: &str, ext: &str) -> Option<(String, u32)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix(prefix)?.strip_suffix(ext)?;
    // YYYYMMDDTHHMMSSZ, optionally -N.
    let (stamp, n) = match rest.split_once('-') {
        Some((stamp, n)) => (stamp, n.parse::<u32>().ok()?),
        None => (rest, 1),
    };
    let b = stamp.as_bytes();
    let well_formed = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    well_formed.then(|| (stamp.to_string(), n))
}

/// Unix seconds as `YYYYMMDDTHHMMSSZ` (UTC).
fn utc_stamp(secs: u64) -> String {
    let t = Utc::from_unix_secs(secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// Copy unit: a whole number of sectors.
const CHUNK: usize = 256 * SECTOR_SIZE;

/// Copy `len` bytes of `src` into `dst`.
fn copy_all(
    src: &File,
    dst: &File,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)?;
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
        progress(at, len);
    }
    dst.set_len(len)?;
    Ok(len)
}

/// Make `dst` equal to the first `len` bytes of `src`, writing only the
/// sectors that differ. Returns the bytes written.
fn update_in_place(
    src: &File,
    dst: &File,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<u64> {
    let dst_len = dst.metadata()?.len();
    let mut ours = vec![0u8; CHUNK];
    let mut theirs = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut ours[..n], at)?;
        let have = dst_len.saturating_sub(at).min(n as u64) as usize;
        dst.read_exact_at(&mut theirs[..have], at)?;
        for (i, sector) in ours[..n].chunks(SECTOR_SIZE).enumerate() {
            let start = i * SECTOR_SIZE;
            let end = start + sector.len();
            if end > have || theirs[start..end] != *sector {
                dst.write_all_at(sector, at + start as u64)?;
                written += sector.len() as u64;
            }
        }
        at += n as u64;
        progress(at, len);
    }
    if dst_len != len {
        dst.set_len(len)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_434_245), "20261123T114405Z");
    }

    #[test]
    fn dated_copies_are_told_apart_and_sort_in_time_order() {
        let key = |s: &str| dated_copy_key(Path::new(s), "v-", ".kbv");
        let first = key("/b/v-20261123T084405Z.kbv").unwrap();
        let second = key("/b/v-20261123T084405Z-2.kbv").unwrap();
        let tenth = key("/b/v-20261123T084405Z-10.kbv").unwrap();
        let later = key("/b/v-20261123T084406Z.kbv").unwrap();
        assert!(first < second && second < tenth && tenth < later);
        assert_eq!(key("/b/v-notes.kbv"), None);
        assert_eq!(key("/b/v-20261123T084405Z-x.kbv"), None);
        assert_eq!(key("/b/vx-20261123T084405Z.kbv"), None);
        assert_eq!(key("/b/v-20261123T084405Z.txt"), None);
    }

    #[test]
    fn in_place_update_writes_only_differing_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data: Vec<u8> = (0..(CHUNK * 2 + 3 * SECTOR_SIZE))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&b, &data).unwrap();
        data[5] ^= 1;
        data[CHUNK + 2 * SECTOR_SIZE] ^= 1;
        data.extend_from_slice(&[9u8; SECTOR_SIZE]);
        std::fs::write(&a, &data).unwrap();
        let (src, dst) = (
            File::open(&a).unwrap(),
            OpenOptions::new().read(true).write(true).open(&b).unwrap(),
        );
        let written = update_in_place(&src, &dst, data.len() as u64, &mut |_, _| {}).unwrap();
        assert_eq!(written, 3 * SECTOR_SIZE as u64);
        assert_eq!(std::fs::read(&b).unwrap(), data);
        // Shrinking: the copy is cut to the vault's size.
        let shorter = &data[..CHUNK];
        std::fs::write(&a, shorter).unwrap();
        let src = File::open(&a).unwrap();
        let written = update_in_place(&src, &dst, shorter.len() as u64, &mut |_, _| {}).unwrap();
        assert_eq!(written, 0);
        assert_eq!(std::fs::read(&b).unwrap(), shorter);
    }
}
