//! Search another process's memory for byte strings, through `/proc/PID/mem`
//! (needs root, or ptrace rights over the process: the mount daemon makes
//! itself non-dumpable).
//!
//! Every mapping in `/proc/PID/maps` is read, not only the readable ones: the
//! kernel lets a ptrace-capable reader see `PROT_NONE` memory too, and a secret
//! left in memory that was merely made inaccessible would still be there.
//! Only `[vvar]`-style kernel mappings are skipped (they are not process
//! memory, and reading them fails). Parts that cannot be read are counted,
//! so a scan that silently read nothing cannot pass for a clean one.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read per `pread`; needles may straddle two reads, so reads overlap.
const CHUNK: usize = 4 << 20;

/// One mapping line of `/proc/PID/maps`.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// The path or pseudo-name (`[heap]`, `[stack]`), or "anon".
    pub name: String,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:x}-{:x} {} {} ({} KiB)",
            self.start,
            self.end,
            self.perms,
            self.name,
            (self.end - self.start) >> 10
        )
    }
}

pub fn mappings(pid: u32) -> Vec<Mapping> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/maps: {e}"));
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?.to_string();
            let name = fields.nth(3).unwrap_or("anon").to_string();
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                perms,
                name,
            })
        })
        .collect()
}

/// A needle found at `addr`, inside `mapping`.
#[derive(Clone, Debug)]
pub struct Hit {
    pub addr: u64,
    pub mapping: Mapping,
}

/// What one scan found.
#[derive(Debug)]
pub struct Scan {
    pub pid: u32,
    /// Per needle (in the order given): its name and every place it was found.
    pub hits: Vec<(String, Vec<Hit>)>,
    pub mappings: usize,
    pub bytes_read: u64,
    /// Bytes that could not be read (counted, never silently skipped).
    pub bytes_unreadable: u64,
}

impl Scan {
    pub fn hits(&self, name: &str) -> &[Hit] {
        self.hits
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.as_slice())
            .unwrap_or_else(|| panic!("no needle named {name}"))
    }

    pub fn found(&self, name: &str) -> bool {
        !self.hits(name).is_empty()
    }

    /// A few lines for a failure message: how often and where.
    pub fn describe(&self, name: &str) -> String {
        let hits = self.hits(name);
        let mut out = format!("{name}: {} hit(s) in process {}", hits.len(), self.pid);
        let mut seen = Vec::new();
        for hit in hits {
            if seen.len() == 8 {
                out.push_str("\n  ...");
                break;
            }
            if !seen.contains(&hit.mapping.start) {
                seen.push(hit.mapping.start);
                let count = hits
                    .iter()
                    .filter(|h| h.mapping.start == hit.mapping.start)
                    .count();
                out.push_str(&format!(
                    "\n  {count} in {} (first at {:x})",
                    hit.mapping, hit.addr
                ));
            }
        }
        out
    }

    /// One line per needle: found or not, and where.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "scan of process {}: {} mappings, {} MiB read, {} KiB unreadable",
            self.pid,
            self.mappings,
            self.bytes_read >> 20,
            self.bytes_unreadable >> 10
        );
        for (name, _) in &self.hits {
            out.push('\n');
            out.push_str(&self.describe(name));
        }
        out
    }
}

/// Kernel-provided mappings that are not the process's memory.
fn is_kernel_mapping(m: &Mapping) -> bool {
    matches!(
        m.name.as_str(),
        "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[vdso]"
    )
}

/// Search all of process `pid`'s memory for each of `needles` (name, bytes).
pub fn scan(pid: u32, needles: &[(&str, &[u8])]) -> Scan {
    let mem = File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("cannot open /proc/{pid}/mem (run as root): {e}"));
    let longest = needles.iter().map(|(_, n)| n.len()).max().unwrap_or(1);
    assert!(needles.iter().all(|(_, n)| !n.is_empty()));
    let maps = mappings(pid);
    let mut scan = Scan {
        pid,
        hits: needles
            .iter()
            .map(|(n, _)| (n.to_string(), vec![]))
            .collect(),
        mappings: maps.len(),
        bytes_read: 0,
        bytes_unreadable: 0,
    };
    let mut buf = vec![0u8; CHUNK + longest];
    for m in maps.iter().filter(|m| !is_kernel_mapping(m)) {
        let mut at = m.start;
        while at < m.end {
            let want = ((m.end - at) as usize).min(buf.len());
            let got = read_fully(&mem, &mut buf[..want], at);
            let last = got < want || at + got as u64 == m.end;
            // The next read starts `longest - 1` bytes before this one ended,
            // so a match starting there is counted by the next read.
            let counted_here = if last { got } else { got + 1 - longest };
            for (i, (_, needle)) in needles.iter().enumerate() {
                for offset in find_all(&buf[..got], needle) {
                    if offset < counted_here {
                        scan.hits[i].1.push(Hit {
                            addr: at + offset as u64,
                            mapping: m.clone(),
                        });
                    }
                }
            }
            scan.bytes_read += got as u64;
            if got < want {
                // The page at `at + got` cannot be read: skip it.
                let bad = at + got as u64;
                let next = ((bad / 4096) + 1) * 4096;
                scan.bytes_unreadable += next.min(m.end) - bad;
                at = next;
            } else if last {
                break;
            } else {
                at += counted_here as u64;
            }
        }
    }
    scan
}

/// `pread` until `buf` is full or an error; returns the bytes read.
fn read_fully(mem: &File, buf: &mut [u8], at: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match mem.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// Every offset of `needle` in `haystack` (glibc's `memmem`: fast even in an
/// unoptimised test build).
pub fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut from = 0;
    while from + needle.len() <= haystack.len() {
        let rest = &haystack[from..];
        // SAFETY: both pointers and lengths describe live slices; memmem only reads.
        let p = unsafe {
            libc::memmem(
                rest.as_ptr().cast(),
                rest.len(),
                needle.as_ptr().cast(),
                needle.len(),
            )
        };
        if p.is_null() {
            break;
        }
        let offset = from + (p as usize - rest.as_ptr() as usize);
        found.push(offset);
        from = offset + 1;
    }
    found
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
        .unwrap_or(false)
}
