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
use std::sync::atomic::{AtomicBool, Ordering};

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
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {}, but the mount daemon keeps all its \
         memory locked and needs about {}; raise it: `ulimit -l unlimited` (or a number of \
         KiB) in the shell that mounts, a `memlock` line in /etc/security/limits.conf \
         (e.g. `{user} hard memlock unlimited` and `{user} soft memlock unlimited`, then log \
         in again), or LimitMEMLOCK=infinity in a systemd unit",
        mib(*limit),
        mib(*needed)
    )]
    MemoryLimit {
        limit: u64,
        needed: u64,
        user: String,
    },
    #[error(
        "cannot lock the mount daemon's memory (mlockall: {source}); the locked-memory limit \
         (RLIMIT_MEMLOCK) is {}: raise it with `ulimit -l unlimited`, /etc/security/limits.conf \
         or LimitMEMLOCK=infinity in a systemd unit",
        mib(*limit)
    )]
    LockAll { limit: u64, source: std::io::Error },
}

/// A heap buffer of plaintext (a `Vec<u8>`), zeroed when dropped with `explicit_bzero`, at
/// `memset` speed.
///
/// `zeroize::Zeroizing<Vec<u8>>` zeroes byte by byte with volatile writes, which is right for
/// a key and too slow for file data: wiping read replies that way took a tenth of the daemon's
/// CPU on a long sequential read, and a twentieth on an untar. The guarantee is the same: the
/// final allocation is wiped; blocks a growing vector left behind are wiped by the binary's
/// allocator ([`WipingAllocator`]).
#[derive(Default)]
pub struct PlainBuf(Vec<u8>);

impl From<Vec<u8>> for PlainBuf {
    fn from(v: Vec<u8>) -> Self {
        PlainBuf(v)
    }
}

/// Shows the length only, never the bytes.
impl std::fmt::Debug for PlainBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlainBuf({} bytes)", self.0.len())
    }
}

impl std::ops::Deref for PlainBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for PlainBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for PlainBuf {
    fn drop(&mut self) {
        // SAFETY: the vector's whole allocation is writable, and its bytes are plain `u8`.
        unsafe { wipe_raw(self.0.as_mut_ptr(), self.0.capacity()) };
    }
}

/// A byte count for a person: "unlimited" or whole MiB (KiB below 1 MiB).
fn mib(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else if bytes < 1 << 20 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{} MiB", bytes >> 20)
    }
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

// ---------------------------------------------------------------------------
// Memory that held secrets after it was freed: the heap and the stacks.
// ---------------------------------------------------------------------------

/// Zero `len` bytes at `ptr` with a write the compiler may not drop as a dead
/// store (glibc's `explicit_bzero`, which is `memset` behind a barrier).
///
/// # Safety
///
/// `ptr` must be valid for writes of `len` bytes.
#[inline]
pub unsafe fn wipe_raw(ptr: *mut u8, len: usize) {
    if len > 0 {
        // SAFETY: the caller guarantees the range is writable.
        unsafe { libc::explicit_bzero(ptr.cast(), len) };
    }
}

/// The global allocator of the `keybound` binary: the system allocator, except
/// that every block is zeroed before it goes back to it.
///
/// Plaintext and key-derived bytes pass through buffers we do not own (redb's
/// page cache and write buffers, fuser's request buffers, the `yubikey` and
/// `pcsc` crates' APDU buffers, `Vec`s in the filesystem layer). Zeroing
/// every block on `dealloc` covers all of them at once, including buffers in
/// dependencies that know nothing of secrets: once a value is dropped, its
/// bytes are gone. `realloc` is an allocation, a copy and a wiping free, so a
/// growing `Vec` never leaves its old contents behind in a block the system
/// allocator freed for it.
///
/// What it does not cover: memory still allocated (that is what dropping the
/// store at lock time is for), memory allocated by C code with `malloc`
/// directly (libpcsclite), and stacks (see [`scrub_stack`]).
pub struct WipingAllocator;

// SAFETY: every method forwards to `System` with the caller's layout (or, in
// `realloc`, a layout the caller vouches for: same alignment, `new_size`
// valid); wiping only touches the block being freed, which the caller owns.
unsafe impl std::alloc::GlobalAlloc for WipingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes that the
        // caller gives up; it is ours to overwrite before it is freed.
        unsafe {
            wipe_freed(ptr, layout.size());
            std::alloc::System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the
        // alignment, does not overflow isize, so this layout is valid.
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size (the caller's contract).
        let new = unsafe { std::alloc::System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the copy stays within
            // the smaller of the two; the old block is then wiped and freed.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// Bytes zeroed per frame while scrubbing the stack.
const SCRUB_CHUNK: usize = 16 * 1024;

/// Stack left unscrubbed at the low end, for the frames of the scrubbing
/// itself (the chunk frames and `explicit_bzero`'s) and signal delivery.
const SCRUB_MARGIN: usize = 2 * SCRUB_CHUNK;

/// Zero the current thread's stack below the caller's frame: every byte the
/// thread's stack has ever reached, down to its low end.
///
/// Functions that return leave their locals behind in the stack below the
/// caller: key schedules that `ring` builds by value, Argon2's working blocks,
/// PIN and ECDH bytes passing through `pcsc`, sectors of plaintext in
/// `ring`'s GCM. Nothing overwrites them until the stack grows that deep
/// again, and glibc keeps the stacks of finished threads for reuse, unwiped.
/// Call this in a thread when it is done with secrets (after unlocking, after
/// locking) and at the end of every thread that handled keys or plaintext
/// (see [`scrub_stack_at_thread_exit`]).
///
/// The extent comes from the thread's stack bounds (`pthread_getattr_np`) and,
/// for the main thread, whose stack grows on demand, from the mapping that
/// holds it in `/proc/self/maps`. Costs about a `memset` of the stack used so
/// far (a few hundred KiB to the 2 MiB of a Rust thread's stack).
#[inline(never)]
pub fn scrub_stack() {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let depth = match stack_low_end(here) {
        // Down to the lowest page ever touched, but never into the margin
        // the scrubbing itself needs at the low end.
        Some(low) => here.saturating_sub(lowest_touched(low, here).max(low + SCRUB_MARGIN)),
        // Bounds unknown: a conservative amount any thread stack has.
        None => 256 * 1024,
    };
    scrub_down(depth);
}

/// Zero `remaining` bytes of stack below this frame, one chunk per frame.
#[inline(never)]
fn scrub_down(remaining: usize) {
    let mut chunk = std::mem::MaybeUninit::<[u8; SCRUB_CHUNK]>::uninit();
    // SAFETY: the chunk is this frame's own memory, SCRUB_CHUNK bytes long.
    unsafe { wipe_raw(chunk.as_mut_ptr().cast(), SCRUB_CHUNK) };
    if remaining > SCRUB_CHUNK {
        scrub_down(remaining - SCRUB_CHUNK);
    }
    // Keeps the chunk (and so this frame) alive across the call above, which
    // then cannot become a tail call reusing this frame.
    std::hint::black_box(&mut chunk);
}

/// The lowest address of the current thread's stack that is mapped, for the
/// stack that holds `here`.
fn stack_low_end(here: usize) -> Option<usize> {
    let mut low = thread_stack_base()?;
    // The main thread's stack is reported down to its rlimit, but only the
    // part it has grown into is mapped (and below that lies a guard gap).
    if let Some(mapped) = mapping_start(here) {
        low = low.max(mapped);
    }
    (low < here).then_some(low)
}

/// Whether [`lock_all_memory`] locked this process: from then on every page
/// it touches stays resident, so a page that is not resident was never
/// touched.
static MEMORY_LOCKED: AtomicBool = AtomicBool::new(false);

/// The lowest page of `low..here` that may hold old data. In a locked
/// process that is the lowest resident one: the pages below it were never
/// touched, and scrubbing them would only fault them in (2 MiB of a fresh
/// thread's stack, milliseconds at every thread's end). Otherwise, where a
/// touched page may be swapped out, `low` itself.
fn lowest_touched(low: usize, here: usize) -> usize {
    if !MEMORY_LOCKED.load(Ordering::Acquire) {
        return low;
    }
    let mut lowest = None;
    let known = resident_runs(low, here, |from, _| {
        lowest.get_or_insert(from);
    });
    if known { lowest.unwrap_or(here) } else { low }
}

/// Blocks at least this large are wiped page by page, skipping pages never
/// touched (see [`wipe_freed`]).
const SPARSE_WIPE_BYTES: usize = 1 << 20;

/// Zero a block that is being freed. A large block in a locked process is
/// zeroed only where it is resident: its other pages were never touched and
/// hold nothing, and zeroing them would fault them in first (fuser's 16 MiB
/// request buffer, mostly untouched, took ~20 ms to wipe at each unmount).
///
/// # Safety
///
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn wipe_freed(ptr: *mut u8, len: usize) {
    if len < SPARSE_WIPE_BYTES || !MEMORY_LOCKED.load(Ordering::Acquire) {
        // SAFETY: the caller's contract.
        return unsafe { wipe_raw(ptr, len) };
    }
    let (start, end) = (ptr as usize, ptr as usize + len);
    let page = page_size();
    let (inner_start, inner_end) = (start.div_ceil(page) * page, end / page * page);
    // SAFETY (all three): sub-ranges of the caller's block.
    let sparse = resident_runs(inner_start, inner_end, |from, to| unsafe {
        wipe_raw(from as *mut u8, to - from)
    });
    if !sparse {
        return unsafe { wipe_raw(ptr, len) };
    }
    unsafe {
        wipe_raw(ptr, inner_start - start);
        wipe_raw(inner_end as *mut u8, end - inner_end);
    }
}

/// Call `f(from, to)` for each run of resident pages in the page-aligned
/// range `start..end` (rounded inward), lowest first, asking `mincore` a
/// megabyte at a time with a buffer on the stack (this runs inside the
/// allocator, so it must not allocate). False if `mincore` failed, after
/// which the caller must assume every page was touched.
fn resident_runs(start: usize, end: usize, mut f: impl FnMut(usize, usize)) -> bool {
    const PER_CALL: usize = 256;
    let page = page_size();
    let mut at = start.div_ceil(page) * page;
    let end = end / page * page;
    let mut vec = [0u8; PER_CALL];
    while at < end {
        let pages = ((end - at) / page).min(PER_CALL);
        // SAFETY: `at` is page-aligned, the range is mapped (the caller's
        // block or stack) and `vec` has at least `pages` bytes.
        if unsafe { libc::mincore(at as *mut libc::c_void, pages * page, vec.as_mut_ptr()) } != 0 {
            return false;
        }
        let mut i = 0;
        while i < pages {
            if vec[i] & 1 == 0 {
                i += 1;
                continue;
            }
            let run = i;
            while i < pages && vec[i] & 1 != 0 {
                i += 1;
            }
            f(at + run * page, at + i * page);
        }
        at += pages * page;
    }
    true
}

/// The low end of this thread's stack according to pthreads.
fn thread_stack_base() -> Option<usize> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before use and
    // destroyed afterwards; the out-pointers are valid.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (rc == 0 && !addr.is_null()).then_some(addr as usize)
    }
}

/// The start of the mapping that contains `addr`, from `/proc/self/maps`.
fn mapping_start(addr: usize) -> Option<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (lo, hi) = range.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        (lo..hi).contains(&addr).then_some(lo)
    })
}

/// Scrub this thread's stack when the thread ends (see [`scrub_stack`]).
///
/// For threads we do not start ourselves, such as fuser's request loop: call
/// it from code that runs on them (a request handler); the first call in a
/// thread registers a thread-local whose destructor scrubs, later calls cost a
/// thread-local lookup. Destructors run after the thread's function has
/// returned, so nearly the whole stack is dead and gets wiped.
pub fn scrub_stack_at_thread_exit() {
    struct ScrubOnExit;
    impl Drop for ScrubOnExit {
        fn drop(&mut self) {
            scrub_stack();
        }
    }
    thread_local! {
        static GUARD: ScrubOnExit = const { ScrubOnExit };
    }
    GUARD.with(|_| {});
}

// ---------------------------------------------------------------------------
// Locking the whole process in RAM (the mount daemon).
// ---------------------------------------------------------------------------

/// What the mount daemon may map beyond what it has when it locks its memory:
/// Argon2id's working memory (64 MiB by default, more if `create` was told),
/// the 64 MiB sector cache, redb's cache, fuser's 16 MiB request buffer,
/// thread stacks and the allocator's arenas. Measured peak: see
/// docs/threat-model.md, "Memory hygiene".
pub const MEMLOCK_HEADROOM: u64 = 1 << 30;

/// Lock every page of this process in RAM, now and in the future
/// (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`), so that no key and
/// no plaintext the mount daemon holds, in buffers of ours or of any
/// dependency, can ever be written to swap. For the mount daemon only.
///
/// With `CAP_IPC_LOCK` (root) there is no limit. Otherwise the soft
/// `RLIMIT_MEMLOCK` is raised to the hard one, and if that is below the
/// process's current size plus [`MEMLOCK_HEADROOM`] this fails with
/// [`SecretError::MemoryLimit`], which names the limit and how to raise it;
/// with too little room, a later allocation would fail instead and abort the
/// daemon while the vault is open. `MCL_ONFAULT` locks pages as they are first
/// touched, so reserved but unused address space (thread stacks, allocator
/// arenas) costs no RAM.
pub fn lock_all_memory() -> Result<(), SecretError> {
    let mut limit = memlock_limit();
    if !has_cap_ipc_lock() && limit.rlim_cur != libc::RLIM_INFINITY {
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            // SAFETY: setrlimit reads a valid rlimit; raising the soft limit
            // to the hard one is always permitted.
            unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
            limit = memlock_limit();
        }
        check_memlock_limit(limit.rlim_cur, current_vm_size())?;
    }
    let shown = if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur
    };
    let flags = libc::MCL_CURRENT | libc::MCL_FUTURE;
    // SAFETY: mlockall has no memory-safety preconditions.
    let mut rc = unsafe { libc::mlockall(flags | MCL_ONFAULT) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel before 4.4 has no MCL_ONFAULT: lock everything up front.
        // SAFETY: as above.
        rc = unsafe { libc::mlockall(flags) };
    }
    if rc == 0 {
        MEMORY_LOCKED.store(true, Ordering::Release);
    }
    if rc != 0 {
        return Err(SecretError::LockAll {
            limit: shown,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `MCL_ONFAULT` (Linux 4.4), which the libc crate lacks on some targets.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
))]
const MCL_ONFAULT: libc::c_int = 0x8000;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc64"
)))]
const MCL_ONFAULT: libc::c_int = 4;

/// The capability bit that lifts RLIMIT_MEMLOCK (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// Refuse a locked-memory limit (`limit`, bytes, for a process without
/// CAP_IPC_LOCK) that leaves less than [`MEMLOCK_HEADROOM`] above `vm_size`.
fn check_memlock_limit(limit: u64, vm_size: u64) -> Result<(), SecretError> {
    let needed = vm_size.saturating_add(MEMLOCK_HEADROOM);
    if limit == libc::RLIM_INFINITY || limit >= needed {
        return Ok(());
    }
    Err(SecretError::MemoryLimit {
        limit,
        needed,
        user: user_name(),
    })
}

fn memlock_limit() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    limit
}

/// A field of `/proc/self/status`, e.g. "VmSize" or "CapEff".
fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().to_string())
    })
}

/// Whether this process may lock memory without limit.
fn has_cap_ipc_lock() -> bool {
    status_field("CapEff")
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The process's address-space size in bytes (what `mlockall` counts).
fn current_vm_size() -> u64 {
    status_field("VmSize")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn user_name() -> String {
    std::env::var("USER").unwrap_or_else(|_| {
        // SAFETY: getuid has no preconditions.
        format!("#{}", unsafe { libc::getuid() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read our own memory through the kernel, so that looking at freed
    /// memory or dead stack frames is a syscall, not undefined behaviour.
    fn read_own_memory(addr: usize, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut buf = vec![0u8; len];
        match mem.read_at(&mut buf, addr as u64) {
            Ok(n) => buf.truncate(n),
            Err(_) => buf.clear(),
        }
        buf
    }

    const PATTERN: &[u8; 16] = b"\xa5kb-scrub-test\x5a\xc3";

    fn contains_pattern(bytes: &[u8]) -> bool {
        bytes.windows(PATTERN.len()).any(|w| w == PATTERN)
    }

    #[test]
    fn wiping_allocator_zeroes_freed_blocks() {
        use std::alloc::{GlobalAlloc, Layout, System};
        let layout = Layout::from_size_align(512, 8).unwrap();
        let fill = |ptr: *mut u8| {
            for i in 0..layout.size() / PATTERN.len() {
                // SAFETY: within the 512-byte block.
                unsafe { std::ptr::copy_nonoverlapping(PATTERN.as_ptr(), ptr.add(i * 16), 16) };
            }
        };
        // Control: the plain system allocator leaves the bytes behind, so the
        // check below could fail.
        // SAFETY: a valid non-zero layout; the block is freed once.
        let plain = unsafe { System.alloc(layout) };
        fill(plain);
        unsafe { System.dealloc(plain, layout) };
        assert!(contains_pattern(&read_own_memory(plain as usize, 512)));

        // SAFETY: as above.
        let wiped = unsafe { WipingAllocator.alloc(layout) };
        fill(wiped);
        unsafe { WipingAllocator.dealloc(wiped, layout) };
        assert!(!contains_pattern(&read_own_memory(wiped as usize, 512)));
    }

    #[test]
    fn wiping_realloc_keeps_contents_and_alignment() {
        use std::alloc::{GlobalAlloc, Layout};
        let layout = Layout::from_size_align(100, 64).unwrap();
        // SAFETY: valid layouts; each block is used within its size and freed once.
        unsafe {
            let p = WipingAllocator.alloc(layout);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let grown = WipingAllocator.realloc(p, layout, 10_000);
            assert_eq!(grown as usize % 64, 0);
            assert!((0..100).all(|i| *grown.add(i) == i as u8));
            let big = Layout::from_size_align(10_000, 64).unwrap();
            let shrunk = WipingAllocator.realloc(grown, big, 10);
            assert!((0..10).all(|i| *shrunk.add(i) == i as u8));
            WipingAllocator.dealloc(shrunk, Layout::from_size_align(10, 64).unwrap());
        }
    }

    /// Leave the pattern in a dead stack frame; return where it was.
    #[inline(never)]
    fn leave_pattern_on_stack() -> usize {
        let mut frame = [0u8; 32 * 1024];
        for chunk in frame.chunks_mut(PATTERN.len()) {
            chunk.copy_from_slice(PATTERN);
        }
        std::hint::black_box(&mut frame);
        frame.as_ptr() as usize
    }

    #[test]
    fn scrub_stack_wipes_dead_frames() {
        let addr = leave_pattern_on_stack();
        assert!(
            contains_pattern(&read_own_memory(addr, 32 * 1024)),
            "control: the dead frame should still hold the pattern"
        );
        scrub_stack();
        assert!(!contains_pattern(&read_own_memory(addr, 32 * 1024)));
    }

    #[test]
    fn scrub_stack_at_thread_exit_wipes_the_finished_thread() {
        let run = |guard: bool| {
            std::thread::spawn(move || {
                if guard {
                    scrub_stack_at_thread_exit();
                }
                leave_pattern_on_stack()
            })
            .join()
            .unwrap()
        };
        // Control: glibc keeps a finished thread's stack, frames and all
        // (unless it unmapped it, when there is nothing left to find).
        let unguarded = read_own_memory(run(false), 32 * 1024);
        assert!(unguarded.is_empty() || contains_pattern(&unguarded));
        let guarded = read_own_memory(run(true), 32 * 1024);
        assert!(!contains_pattern(&guarded));
    }

    fn unlock_for_test() {
        // SAFETY: munlockall has no preconditions.
        unsafe { libc::munlockall() };
        MEMORY_LOCKED.store(false, Ordering::Release);
    }

    #[test]
    fn scrub_in_a_locked_process_skips_untouched_stack_and_still_wipes_dead_frames() {
        if !has_cap_ipc_lock() {
            // Only root can lock a whole test process; CI runs as root.
            return;
        }
        lock_all_memory().unwrap();
        let (skipped, left) = std::thread::spawn(|| {
            let addr = leave_pattern_on_stack();
            let marker = 0u8;
            let here = std::hint::black_box(&marker) as *const u8 as usize;
            let low = stack_low_end(here).unwrap();
            let skipped = lowest_touched(low, here) - low;
            scrub_stack();
            (skipped, read_own_memory(addr, 32 * 1024))
        })
        .join()
        .unwrap();
        unlock_for_test();
        // A Rust thread has 2 MiB of stack and this one touched ~40 KiB.
        assert!(skipped > 1 << 20, "only {skipped} untouched bytes skipped");
        assert!(!left.is_empty() && !contains_pattern(&left));
    }

    #[test]
    fn a_large_freed_block_in_a_locked_process_is_wiped_where_touched_only() {
        use std::alloc::{GlobalAlloc, Layout, System};
        if !has_cap_ipc_lock() {
            // Only root can lock a whole test process; CI runs as root.
            return;
        }
        lock_all_memory().unwrap();
        let len = 4 << 20;
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a valid layout; writes stay inside the block, freed once.
        let (wiped, resident_after) = unsafe {
            let p = System.alloc(layout);
            // Page by page: with a transparent huge page, one touch would
            // make 2 MiB resident at once.
            libc::madvise(p.cast(), len, libc::MADV_NOHUGEPAGE);
            for at in [0, 5000, len / 2 + 123, len - PATTERN.len()] {
                std::ptr::copy_nonoverlapping(PATTERN.as_ptr(), p.add(at), PATTERN.len());
            }
            wipe_freed(p, len);
            // Counted before the check below reads (and so faults in) every page.
            let mut resident = 0;
            resident_runs(p as usize, p as usize + len, |from, to| {
                resident += (to - from) / page_size()
            });
            let block = std::slice::from_raw_parts(p, len);
            let wiped = !contains_pattern(block);
            System.dealloc(p, layout);
            (wiped, resident)
        };
        unlock_for_test();
        assert!(wiped, "the pattern survived");
        // Four pages were touched (two at the start, one in the middle, one
        // at the end); wiping faulted in none of the other ~1,000.
        assert!(resident_after <= 8, "{resident_after} pages resident");
    }

    #[test]
    fn locks_all_memory_as_root_and_explains_a_low_limit() {
        if has_cap_ipc_lock() {
            lock_all_memory().unwrap();
            let locked = status_field("VmLck").unwrap();
            unlock_for_test();
            assert_ne!(locked, "0 kB", "nothing locked");
        }
        check_memlock_limit(libc::RLIM_INFINITY, 1 << 30).unwrap();
        check_memlock_limit(2 << 30, 512 << 20).unwrap();
        let err = check_memlock_limit(8 << 20, 100 << 20)
            .unwrap_err()
            .to_string();
        for part in [
            "RLIMIT_MEMLOCK",
            "8 MiB",
            "1124 MiB",
            "ulimit -l",
            "limits.conf",
            "LimitMEMLOCK",
        ] {
            assert!(err.contains(part), "{part:?} missing in: {err}");
        }
    }

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
