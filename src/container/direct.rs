//! Long sequential reads of the container that bypass the kernel's page cache.
//!
//! A buffered read makes the kernel allocate a page-cache page for every 4 KiB of the
//! container and copy out of it. On a virtual machine that allocation is the expensive part:
//! reading a 1.6 GB container cold on the development VM took 2.8–3.2 s of system time
//! buffered, against 0.04 s with `O_DIRECT` (docs/benchmarks.md). File data is cached above
//! us anyway, in the mount's own page cache, so caching its ciphertext a second time buys
//! nothing.
//!
//! So a sequential read of file data reads a whole [`WINDOW_BYTES`] of ciphertext with one
//! `O_DIRECT` `pread` into one reused buffer and serves the next requests from it. The window
//! holds ciphertext only, which is not secret: it is neither locked nor wiped. Every sector
//! write drops the window if it overlaps it ([`DirectReader::forget`]), so the window never
//! serves a sector older than the file.
//!
//! Where the file system refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE file systems),
//! or a direct read fails for any reason, the store falls back to its buffered reads for good.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Bytes read per direct read: large enough that the device's latency is paid rarely.
pub(crate) const WINDOW_BYTES: usize = 2 << 20;

/// Alignment of a direct read's offset, length and buffer. 4096 suits every logical block
/// size in use (512 and 4096); `statx`'s `STATX_DIOALIGN` could say less, never more.
const ALIGN: usize = 4096;

/// A second handle on the container, opened with `O_DIRECT`, two windows, and a thread that
/// reads the window after the one being read while the store decrypts this one.
pub(crate) struct DirectReader {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

struct Shared {
    file: File,
    state: Mutex<State>,
    /// Signalled when there is work for the reading thread, and when it finished a window.
    changed: Condvar,
    /// Cleared when a direct read failed: from then on the store reads buffered.
    usable: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The windows not being read (two in all, one of them may be with the thread).
    windows: Vec<Window>,
    /// Work for the thread: read a window at this offset into this buffer.
    request: Option<(u64, Window)>,
    /// The offset of the window the thread is reading, and whether a write has made what it
    /// reads stale.
    reading: Option<u64>,
    stale: bool,
    stop: bool,
}

/// Bytes `start..start + len` of the file, at `at..at + len` of `buf` (`buf[at]` aligned).
struct Window {
    buf: Vec<u8>,
    at: usize,
    start: u64,
    len: usize,
}

impl Window {
    /// A window with no buffer yet: a store that is never read in order allocates none.
    fn empty() -> Self {
        Window {
            buf: Vec::new(),
            at: 0,
            start: 0,
            len: 0,
        }
    }

    fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    fn contains(&self, offset: u64) -> bool {
        self.len > 0 && self.start <= offset && offset < self.end()
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.len > 0 && ranges_meet(self.start, self.len as u64, offset, len)
    }

    /// The bytes from `offset` to the end of the window or `end`, whichever comes first.
    fn bytes(&self, offset: u64, end: u64) -> &[u8] {
        let from = self.at + (offset - self.start) as usize;
        let to = self.at + (end.min(self.end()) - self.start) as usize;
        &self.buf[from..to]
    }

    /// Reads the window at `start` (aligned); an error leaves it empty.
    fn fill(&mut self, file: &File, start: u64) -> io::Result<()> {
        self.len = 0;
        if self.buf.is_empty() {
            self.buf = vec![0u8; WINDOW_BYTES + ALIGN];
            // Aligning within the vector keeps this free of `unsafe`: a `Vec` never moves its
            // buffer unless it grows, and this one never does.
            self.at = self.buf.as_ptr().align_offset(ALIGN);
        }
        let at = self.at;
        let n = read_full(file, &mut self.buf[at..at + WINDOW_BYTES], start)?;
        self.start = start;
        self.len = n;
        Ok(())
    }

    fn full(&self) -> bool {
        self.len == WINDOW_BYTES
    }
}

/// Where the bytes of one read are: one window, or the end of one and the start of the next.
enum Found {
    In(usize, Option<usize>),
    /// The thread is reading a window that holds them: wait for it.
    Wait,
    Missing,
}

impl DirectReader {
    /// Opens `file` again with `O_DIRECT` (through `/proc/self/fd`, so it is the same file
    /// even if its path changed) and starts the reading thread. `None` where either is
    /// refused: the store then reads buffered.
    pub(crate) fn open(file: &File) -> Option<Self> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .inspect_err(|e| tracing::debug!("no direct reads of the container: {e}"))
            .ok()?;
        let shared = Arc::new(Shared {
            file: direct,
            state: Mutex::new(State {
                windows: vec![Window::empty(), Window::empty()],
                ..State::default()
            }),
            changed: Condvar::new(),
            usable: AtomicBool::new(true),
        });
        let for_thread = shared.clone();
        let reader = std::thread::Builder::new()
            .name("keybound-read-ahead".into())
            .spawn(move || for_thread.serve())
            .inspect_err(|e| tracing::debug!("no direct reads of the container: {e}"))
            .ok()?;
        Some(DirectReader {
            shared,
            reader: Some(reader),
        })
    }

    /// Calls `f(position, bytes)` for the pieces (one or two) that together are bytes
    /// `offset..offset + len` of the file, `position` counting from `offset`. They come from
    /// the windows; when the windows do not hold them and `may_fill` (a sequential read), a
    /// new window starting at `offset` is read first. After a read, the thread is asked to
    /// read the window that follows. False (and `f` not called) when the bytes were not read
    /// directly: the caller reads them buffered, which also says why if they cannot be read
    /// at all (a truncated file, an I/O error).
    pub(crate) fn read(
        &self,
        offset: u64,
        len: usize,
        may_fill: bool,
        mut f: impl FnMut(usize, &[u8]),
    ) -> bool {
        let sh = &*self.shared;
        if len > WINDOW_BYTES || !sh.usable.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut st) = sh.state.lock() else {
            return false;
        };
        let end = offset + len as u64;
        let (first, second) = loop {
            if !sh.usable.load(Ordering::Acquire) {
                return false;
            }
            match st.find(offset, end) {
                Found::In(a, b) => break (a, b),
                Found::Wait => match sh.changed.wait(st) {
                    Ok(guard) => st = guard,
                    Err(_) => return false,
                },
                Found::Missing if may_fill => match sh.fill_for(&mut st, offset, end) {
                    Some(i) => break (i, None),
                    None => return false,
                },
                Found::Missing => return false,
            }
        };
        let head = st.windows[first].bytes(offset, end);
        let split = head.len();
        f(0, head);
        let last = match second {
            Some(b) => {
                f(split, st.windows[b].bytes(offset + split as u64, end));
                b
            }
            None => first,
        };
        if st.read_ahead_after(last) {
            sh.changed.notify_all();
        }
        true
    }

    /// A write of bytes `offset..offset + len`: drop every window that holds any of them, and
    /// what the thread is reading if it may.
    pub(crate) fn forget(&self, offset: u64, len: u64) {
        let Ok(mut st) = self.shared.state.lock() else {
            return;
        };
        for w in &mut st.windows {
            if w.overlaps(offset, len) {
                w.len = 0;
            }
        }
        let window_meets = |start: u64| ranges_meet(start, WINDOW_BYTES as u64, offset, len);
        if st.reading.is_some_and(window_meets) {
            st.stale = true;
        }
        if st.request.as_ref().is_some_and(|r| window_meets(r.0))
            && let Some((_, w)) = st.request.take()
        {
            st.windows.push(w);
        }
    }
}

impl Drop for DirectReader {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

impl State {
    fn find(&self, offset: u64, end: u64) -> Found {
        let at = |pos: u64| self.windows.iter().position(|w| w.contains(pos));
        let being_read = |pos: u64| {
            let pending = self.reading.or(self.request.as_ref().map(|r| r.0));
            pending.is_some_and(|s| s <= pos && pos < s + WINDOW_BYTES as u64)
        };
        match at(offset) {
            Some(a) if end <= self.windows[a].end() => Found::In(a, None),
            Some(a) => {
                let next = self.windows[a].end();
                match at(next) {
                    Some(b) if self.windows[b].start == next && end <= self.windows[b].end() => {
                        Found::In(a, Some(b))
                    }
                    _ if self.windows[a].full() && being_read(next) => Found::Wait,
                    _ => Found::Missing,
                }
            }
            None if being_read(offset) => Found::Wait,
            None => Found::Missing,
        }
    }

    /// After a read that ended in window `last`: if nothing holds or is reading what follows
    /// it, hand the other buffer to the thread to read that. True if it did.
    fn read_ahead_after(&mut self, last: usize) -> bool {
        let next = self.windows[last].end();
        if !self.windows[last].full()
            || self.reading.is_some()
            || self.request.is_some()
            || self.windows.iter().any(|w| w.contains(next))
        {
            return false;
        }
        let Some(other) = (0..self.windows.len()).find(|&i| i != last) else {
            return false;
        };
        let mut w = self.windows.swap_remove(other);
        // What it held is given up: were it to come back unread (a write cancels the
        // request), it must not be served, since `forget` no longer saw it.
        w.len = 0;
        self.request = Some((next, w));
        true
    }
}

impl Shared {
    /// Reads a window at `offset` (aligned down) now, into a buffer the thread does not hold;
    /// returns its index if it holds `offset..end` (the file may end before).
    fn fill_for(&self, st: &mut MutexGuard<'_, State>, offset: u64, end: u64) -> Option<usize> {
        // The buffer behind the others: the one with no bytes, else the lowest.
        let i = (0..st.windows.len()).min_by_key(|&i| {
            let w = &st.windows[i];
            (w.len > 0, w.start)
        })?;
        let start = offset - offset % ALIGN as u64;
        if let Err(e) = st.windows[i].fill(&self.file, start) {
            self.give_up(&e);
            return None;
        }
        let w = &st.windows[i];
        (w.contains(offset) && end <= w.end()).then_some(i)
    }

    fn give_up(&self, e: &io::Error) {
        tracing::debug!("a direct read of the container failed, reading buffered: {e}");
        self.usable.store(false, Ordering::Release);
    }

    /// The reading thread: reads each requested window without holding the lock.
    fn serve(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        loop {
            while st.request.is_none() && !st.stop {
                st = match self.changed.wait(st) {
                    Ok(guard) => guard,
                    Err(_) => return,
                };
            }
            if st.stop {
                return;
            }
            let Some((start, mut w)) = st.request.take() else {
                continue;
            };
            st.reading = Some(start);
            st.stale = false;
            drop(st);
            let result = w.fill(&self.file, start);
            st = match self.state.lock() {
                Ok(guard) => guard,
                Err(_) => return,
            };
            if let Err(e) = &result {
                self.give_up(e);
            }
            if st.stale {
                w.len = 0;
            }
            st.reading = None;
            st.windows.push(w);
            self.changed.notify_all();
        }
    }
}

/// Whether bytes `a..a + a_len` and `b..b + b_len` share any byte.
fn ranges_meet(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b + b_len && b < a + a_len
}

/// Reads until `buf` is full or the file ends (a direct read may return short at its end).
fn read_full(file: &File, buf: &mut [u8], start: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], start + n as u64) {
            Ok(0) => break,
            // Past a short read the offset is no longer aligned: stop, the window is shorter.
            Ok(k) if k % ALIGN != 0 => return Ok(n + k),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, bytes).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, file)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn read_vec(r: &DirectReader, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len];
        r.read(offset, len, true, |at, b| {
            out[at..at + b.len()].copy_from_slice(b)
        })
        .then_some(out)
    }

    #[test]
    fn unaligned_reads_across_windows_return_the_files_bytes() {
        let data = pattern(3 * WINDOW_BYTES + 1234);
        let (_dir, file) = file_with(&data);
        let Some(r) = DirectReader::open(&file) else {
            eprintln!("skipped: the test directory's file system refuses O_DIRECT");
            return;
        };
        // Out of order and outside the window, nothing is read.
        assert!(!r.read(20_000, 10, false, |_, _| ()));
        let mut offset = 20_000u64;
        while offset + 66_000 <= data.len() as u64 {
            let got = read_vec(&r, offset, 66_000).expect("a direct read");
            assert_eq!(got, data[offset as usize..offset as usize + 66_000]);
            offset += 66_000;
        }
        // The file's tail, shorter than a window, is read too; past the end is refused.
        let tail = data.len() as u64 - 100;
        assert_eq!(read_vec(&r, tail, 100).unwrap(), data[tail as usize..]);
        assert!(read_vec(&r, tail, 101).is_none());
    }

    #[test]
    fn a_write_into_the_window_is_seen_by_the_next_read() {
        let data = pattern(WINDOW_BYTES);
        let (_dir, file) = file_with(&data);
        let Some(r) = DirectReader::open(&file) else {
            eprintln!("skipped: the test directory's file system refuses O_DIRECT");
            return;
        };
        assert_eq!(read_vec(&r, 0, 4124).unwrap(), data[..4124]);
        file.write_all_at(&[0xAB; 300], 5000).unwrap();
        // Not forgotten: the window still serves what it read (why writes must call forget).
        assert_eq!(read_vec(&r, 5000, 300).unwrap(), data[5000..5300]);
        // A write elsewhere keeps the window; one inside it drops it.
        r.forget(WINDOW_BYTES as u64 + 10, 10);
        assert_eq!(read_vec(&r, 5000, 300).unwrap(), data[5000..5300]);
        r.forget(5000, 300);
        assert_eq!(read_vec(&r, 5000, 300).unwrap(), vec![0xAB; 300]);
    }
}
