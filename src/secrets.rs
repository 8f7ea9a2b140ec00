//! Key material that wipes itself and stays in locked memory.
//!
//! Every secret (PIN, password, ECDH shared secret, later the master key) lives
//! in a [`SecretBytes`]: its own anonymous mapping, `mlock`ed so it is never
//! swapped, marked `MADV_DONTDUMP` so it never lands in a core dump, and zeroed
//! before it is unmapped. A mapping per secret (rather than `mlock` on heap
//! memory) means unlocking one secret can never unlock a page another secret
//! shares.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::ptr::NonNull;

use zeroize::Zeroize;

/// Why a secret could not be placed in locked memory or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "cannot lock {bytes} bytes of memory for a secret ({source}); raise the locked-memory \
         limit (`ulimit -l`, or LimitMEMLOCK= in a systemd unit)"
    )]
    Lock {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("cannot allocate memory for a secret: {0}")]
    Alloc(std::io::Error),
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} in {path} is empty")]
    EmptyFile { what: &'static str, path: String },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
}

/// A fixed-length secret byte string in locked, non-dumpable memory, zeroed on drop.
pub struct SecretBytes {
    ptr: NonNull<u8>,
    len: usize,
    mapped: usize,
}

// SAFETY: the mapping is owned exclusively by this value; no aliasing pointers exist.
unsafe impl Send for SecretBytes {}
// SAFETY: shared access only ever reads the bytes.
unsafe impl Sync for SecretBytes {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes.
    pub fn zeroed(len: usize) -> Result<Self, SecretError> {
        let page = page_size();
        let mapped = len.max(1).div_ceil(page) * page;
        // SAFETY: anonymous private mapping, no file descriptor; result checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(SecretError::Alloc(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap never returns null on success");
        let secret = SecretBytes { ptr, len, mapped };
        // SAFETY: the range is exactly the mapping we own.
        if unsafe { libc::mlock(raw, mapped) } != 0 {
            return Err(SecretError::Lock {
                bytes: mapped,
                source: std::io::Error::last_os_error(),
            });
        }
        // Best effort: a kernel without MADV_DONTDUMP still has RLIMIT_CORE=0 in the daemon.
        // SAFETY: the range is exactly the mapping we own.
        unsafe { libc::madvise(raw, mapped, libc::MADV_DONTDUMP) };
        Ok(secret)
    }

    /// A secret holding a copy of `bytes`. The caller should wipe its own copy.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, SecretError> {
        let mut secret = Self::zeroed(bytes.len())?;
        secret.as_mut().copy_from_slice(bytes);
        Ok(secret)
    }

    /// Take ownership of `bytes`, wiping the original buffer.
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Self, SecretError> {
        let secret = Self::from_slice(&bytes);
        bytes.zeroize();
        secret
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn expose(&self) -> &[u8] {
        // SAFETY: ptr is valid for `mapped >= len` bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Constant-time comparison, so comparing secrets leaks no prefix length.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        if self.len != other.len() {
            return false;
        }
        let diff = self
            .expose()
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl AsMut<[u8]> for SecretBytes {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for `len` bytes, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // SAFETY: the whole mapping is ours; zero it all, then release it.
        unsafe {
            let all = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.mapped);
            all.zeroize();
            libc::munlock(self.ptr.as_ptr().cast(), self.mapped);
            libc::munmap(self.ptr.as_ptr().cast(), self.mapped);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes, redacted)", self.len)
    }
}

/// Read one secret line (a PIN or password) from a file, or from stdin for `-`.
/// A single trailing newline (`\n` or `\r\n`) is removed; nothing else is trimmed,
/// because spaces can be part of a password.
pub fn read_secret_file(path: &Path, what: &'static str) -> Result<SecretBytes, SecretError> {
    const MAX: usize = 4096;
    let shown = path.display().to_string();
    let io_err = |source| SecretError::ReadFile {
        what,
        path: shown.clone(),
        source,
    };
    let mut raw = Vec::with_capacity(MAX + 1);
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(MAX as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(io_err)?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX as u64 + 1).read_to_end(&mut raw))
            .map_err(io_err)?;
    }
    let secret = first_line(&raw, what, &shown, MAX);
    raw.zeroize();
    secret
}

fn first_line(
    raw: &[u8],
    what: &'static str,
    shown: &str,
    max: usize,
) -> Result<SecretBytes, SecretError> {
    if raw.len() > max {
        return Err(SecretError::TooLong { what, max });
    }
    let end = raw.iter().position(|&b| b == b'\n').unwrap_or(raw.len());
    let line = raw[..end].strip_suffix(b"\r").unwrap_or(&raw[..end]);
    if line.is_empty() {
        return Err(SecretError::EmptyFile {
            what,
            path: shown.to_string(),
        });
    }
    SecretBytes::from_slice(line)
}

/// Switch off core dumps and ptrace attach for this process, so secrets cannot
/// leave it through a crash dump or a debugger run by another user.
pub fn harden_process() -> std::io::Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_compares_bytes() {
        let s = SecretBytes::from_slice(b"correct horse").unwrap();
        assert_eq!(s.expose(), b"correct horse");
        assert!(s.ct_eq(b"correct horse"));
        assert!(!s.ct_eq(b"correct horsE"));
        assert!(!s.ct_eq(b"correct"));
    }

    #[test]
    fn memory_is_locked_and_not_dumpable() {
        let s = SecretBytes::from_slice(&[7u8; 32]).unwrap();
        let addr = s.expose().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut found = false;
        while let Some(line) = lines.next() {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            else {
                continue;
            };
            if !(lo..hi).contains(&addr) {
                continue;
            }
            let block: Vec<&str> = lines.by_ref().take_while(|l| !l.contains('-')).collect();
            let locked = block.iter().find(|l| l.starts_with("Locked:")).unwrap();
            let flags = block.iter().find(|l| l.starts_with("VmFlags:")).unwrap();
            assert!(
                !locked.contains(" 0 kB"),
                "secret page not locked: {locked}"
            );
            assert!(flags.contains(" dd"), "secret page dumpable: {flags}");
            found = true;
            break;
        }
        assert!(found, "secret mapping not in /proc/self/smaps");
    }

    #[test]
    fn debug_output_is_redacted() {
        let s = SecretBytes::from_slice(b"123456").unwrap();
        assert!(!format!("{s:?}").contains("123456"));
    }

    #[test]
    fn secret_file_strips_one_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, b" pass word \r\nsecond line\n").unwrap();
        let s = read_secret_file(&path, "password").unwrap();
        assert_eq!(s.expose(), b" pass word ");
    }

    #[test]
    fn empty_or_missing_secret_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, b"\n").unwrap();
        let err = read_secret_file(&path, "PIN").unwrap_err().to_string();
        assert!(
            err.contains("PIN") && err.contains(&path.display().to_string()),
            "{err}"
        );
        let missing = dir.path().join("absent");
        let err = read_secret_file(&missing, "PIN").unwrap_err().to_string();
        assert!(err.contains("absent"), "{err}");
    }
}
