//! The hash chain: an append-only file of JSON lines, each carrying its
//! sequence number (`seq`, from 1) and `prev`, the SHA-256 (hex) of the
//! previous line's bytes (without the newline; all zeros for the first line).
//! Next to the log, `FILE.head` holds the last entry's number and hash, so a
//! truncated tail or an edited last line is seen too.
//!
//! Appends hold an exclusive `flock` on the log from reading its last line to
//! updating the head, write each line with one `write` to an `O_APPEND`
//! descriptor and `fsync` it: concurrent writers (several processes, several
//! users of one system-wide log) never interleave or fork the chain.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::AuditError;

/// `prev` of the first entry.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of one line's bytes (without its newline), lowercase hex.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// The chain head: how many entries the log holds and the last one's hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// What one append wrote.
#[derive(Debug, Clone)]
pub struct Appended {
    pub seq: u64,
    /// The hash of the new line (the next line's `prev`).
    pub hash: String,
    /// The line as written, without its newline.
    pub line: String,
}

/// Where the head of `log` is kept: `LOG.head` beside it.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(".head");
    PathBuf::from(name)
}

/// Append one line to `log`. `build(seq, prev)` makes the line (a JSON object
/// that must carry exactly these two values as `seq` and `prev`, on one
/// line); it runs under the lock, so `seq` and `prev` are final.
pub fn append(
    log: &Path,
    build: impl FnOnce(u64, &str) -> Result<String, AuditError>,
) -> Result<Appended, AuditError> {
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| AuditError::io("cannot create the audit log directory", dir, e))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(log)
        .map_err(|e| AuditError::io("cannot open the audit log", log, e))?;
    flock(&file, libc::LOCK_EX).map_err(|e| AuditError::io("cannot lock the audit log", log, e))?;
    let last = last_entry(&file, log)?;
    let (seq, prev) = match &last {
        Some(head) => (head.seq + 1, head.hash.as_str()),
        None => (1, ZERO_HASH),
    };
    let line = build(seq, prev)?;
    debug_assert!(!line.contains('\n'), "an audit line must be one line");
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    (&file)
        .write_all(&bytes)
        .and_then(|()| file.sync_data())
        .map_err(|e| AuditError::io("cannot write the audit log", log, e))?;
    let hash = line_hash(line.as_bytes());
    write_head(
        log,
        &Head {
            seq,
            hash: hash.clone(),
        },
    )?;
    // Closing the file releases the lock.
    drop(file);
    Ok(Appended { seq, hash, line })
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The number and hash of the log's last line, read from its end.
fn last_entry(file: &File, log: &Path) -> Result<Option<Head>, AuditError> {
    let len = file
        .metadata()
        .map_err(|e| AuditError::io("cannot read the audit log", log, e))?
        .len();
    if len == 0 {
        return Ok(None);
    }
    let unusable = |problem: String| AuditError::Unusable {
        path: log.to_path_buf(),
        problem,
    };
    // Read back from the end until the chunk holds the whole last line.
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| AuditError::io("cannot read the audit log", log, e))?;
        if buf.last() != Some(&b'\n') {
            return Err(unusable("it ends in an incomplete line".into()));
        }
        let body = &buf[..buf.len() - 1];
        let line = match body.iter().rposition(|&b| b == b'\n') {
            Some(nl) => &body[nl + 1..],
            None if start == 0 => body,
            None => {
                chunk = chunk.saturating_mul(4);
                continue;
            }
        };
        let seq = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
            .ok_or_else(|| unusable("its last line is not an audit entry".into()))?;
        return Ok(Some(Head {
            seq,
            hash: line_hash(line),
        }));
    }
}

/// Replace the head file atomically (a temp file renamed over it).
fn write_head(log: &Path, head: &Head) -> Result<(), AuditError> {
    let path = head_path(log);
    let mut tmp_name = path.as_os_str().to_os_string();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut text = serde_json::to_string(head)?;
    text.push('\n');
    let result = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_data()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(AuditError::io("cannot write the audit head", &path, e));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The result of walking an intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    /// The last entry (`None` for an empty log).
    pub head: Option<Head>,
}

/// Check that line `seq` of the log hashes to `hash`: a head copied elsewhere
/// earlier (`keybound audit verify` prints it), which catches a rewrite of
/// the whole log by someone who could also rewrite the head file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;

    /// `SEQ:HASH`, as `verify` prints it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s.split_once(':').ok_or_else(|| {
            "expected SEQ:HASH (as `keybound audit verify` prints it)".to_string()
        })?;
        let seq = seq
            .parse()
            .map_err(|_| format!("{seq:?} is not an entry number"))?;
        let hash = hash.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the hash must be 64 hex digits".into());
        }
        Ok(Anchor { seq, hash })
    }
}

/// A log as read: its lines and its head file.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// The lines, without newlines (an incomplete last line included).
    pub lines: Vec<Vec<u8>>,
    /// Whether the log file exists at all.
    pub exists: bool,
    /// The head file's text, if there is one.
    pub head: Option<String>,
}

/// Read the log and its head under a shared lock, so no append is half done.
pub fn read(log: &Path) -> Result<Contents, AuditError> {
    let head_file = head_path(log);
    let mut file = match File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Contents {
                lines: Vec::new(),
                exists: false,
                head: read_head_text(&head_file)?,
            });
        }
        Err(e) => return Err(AuditError::io("cannot open the audit log", log, e)),
    };
    flock(&file, libc::LOCK_SH).map_err(|e| AuditError::io("cannot lock the audit log", log, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| AuditError::io("cannot read the audit log", log, e))?;
    let head = read_head_text(&head_file)?;
    drop(file);
    let mut lines: Vec<Vec<u8>> = bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    // A complete log ends in a newline: the split leaves one empty piece.
    // Anything else there is an incomplete last line, kept for `verify`.
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    Ok(Contents {
        lines,
        exists: true,
        head,
    })
}

fn read_head_text(path: &Path) -> Result<Option<String>, AuditError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditError::io("cannot read the audit head", path, e)),
    }
}

/// Walk the chain of `log`: every line must be an entry numbered one more
/// than the line before and carry that line's hash; the last must match the
/// head file; each anchor must match its line. The first problem is an
/// [`AuditError::Tampered`] naming the line.
pub fn verify(log: &Path, anchors: &[Anchor]) -> Result<Verified, AuditError> {
    let Contents {
        lines,
        exists,
        head: head_text,
    } = read(log)?;
    let tampered = |line: u64, problem: String| AuditError::Tampered {
        path: log.to_path_buf(),
        line,
        problem,
    };
    let head = match &head_text {
        Some(text) => Some(serde_json::from_str::<Head>(text.trim()).map_err(|_| {
            tampered(
                lines.len() as u64,
                format!(
                    "the head file {} is not a valid chain head",
                    head_path(log).display()
                ),
            )
        })?),
        None => None,
    };
    if !exists {
        return match head {
            Some(h) if h.seq > 0 => Err(tampered(
                1,
                format!("the log is gone, but its head records {} entries", h.seq),
            )),
            _ => Err(AuditError::Missing {
                path: log.to_path_buf(),
            }),
        };
    }

    let mut prev_hash = ZERO_HASH.to_string();
    let mut prev_seq = 0u64;
    let mut hashes = Vec::with_capacity(lines.len());
    for (index, raw) in lines.iter().enumerate() {
        let n = index as u64 + 1;
        let value: serde_json::Value = serde_json::from_slice(raw).map_err(|_| {
            tampered(
                n,
                "not a valid audit entry (edited by hand, or an incomplete write)".into(),
            )
        })?;
        let seq = value
            .get("seq")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| tampered(n, "the entry has no sequence number".into()))?;
        let prev = value
            .get("prev")
            .and_then(|p| p.as_str())
            .ok_or_else(|| tampered(n, "the entry has no `prev` hash".into()))?;
        if seq != prev_seq + 1 {
            let problem = if n == 1 {
                format!(
                    "the log starts at entry {seq}, not 1: its beginning was removed or replaced"
                )
            } else if seq <= prev_seq {
                format!(
                    "entry {seq} follows entry {prev_seq}: lines were reordered, duplicated \
                     or inserted"
                )
            } else {
                format!(
                    "entry {seq} follows entry {prev_seq}: {} entr{} removed, or lines reordered",
                    seq - prev_seq - 1,
                    if seq - prev_seq - 1 == 1 {
                        "y was"
                    } else {
                        "ies were"
                    }
                )
            };
            return Err(tampered(n, problem));
        }
        if prev != prev_hash {
            return Err(if n == 1 {
                tampered(
                    1,
                    "the first entry does not start the chain (its `prev` is not zero)".into(),
                )
            } else {
                tampered(
                    n - 1,
                    format!(
                        "changed after it was written: it hashes to {prev_hash}, but line {n} \
                         records {prev} (or line {n}'s `prev` was edited)"
                    ),
                )
            });
        }
        prev_hash = line_hash(raw);
        prev_seq = seq;
        hashes.push(prev_hash.clone());
    }
    let entries = lines.len() as u64;
    let last = (entries > 0).then(|| Head {
        seq: prev_seq,
        hash: prev_hash.clone(),
    });
    match (&head, &last) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(tampered(
                entries,
                format!(
                    "the head file {} is missing, so a truncated tail cannot be ruled out \
                     (deleted along with the end of the log?)",
                    head_path(log).display()
                ),
            ));
        }
        (Some(h), _) if h.seq > prev_seq => {
            let missing = h.seq - prev_seq;
            return Err(tampered(
                entries + 1,
                format!(
                    "missing: the head records {} entries, the log ends at entry {prev_seq} \
                     ({missing} entr{} removed from the end)",
                    h.seq,
                    if missing == 1 { "y was" } else { "ies were" }
                ),
            ));
        }
        (Some(h), _) if h.seq < prev_seq => {
            return Err(tampered(
                h.seq + 1,
                format!(
                    "not covered by the head (which ends at entry {}): appended without \
                     updating the head (by hand, or an append interrupted by a crash)",
                    h.seq
                ),
            ));
        }
        (Some(h), Some(l)) if h.hash != l.hash => {
            return Err(tampered(
                entries,
                "changed after it was written: its hash does not match the head file".into(),
            ));
        }
        (Some(_), _) => {}
    }
    for anchor in anchors {
        let ok = anchor
            .seq
            .checked_sub(1)
            .and_then(|i| hashes.get(i as usize))
            .is_some_and(|h| *h == anchor.hash);
        if !ok {
            let line = anchor.seq.min(entries + 1);
            return Err(tampered(
                line,
                format!(
                    "does not match the anchor {}:{} (the log was rewritten or cut since the \
                     anchor was taken)",
                    anchor.seq, anchor.hash
                ),
            ));
        }
    }
    Ok(Verified {
        entries,
        head: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(log: &Path, n: u64) -> Appended {
        append(log, |seq, prev| {
            Ok(serde_json::json!({"seq": seq, "prev": prev, "action": "test", "n": n}).to_string())
        })
        .unwrap()
    }

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub").join("audit.log");
        for i in 1..=n {
            assert_eq!(add(&log, i).seq, i);
        }
        (dir, log)
    }

    fn lines(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(log: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        if !lines.is_empty() {
            text.push('\n');
        }
        std::fs::write(log, text).unwrap();
    }

    #[track_caller]
    fn assert_tampered(log: &Path, want_line: u64, want: &str) {
        match verify(log, &[]) {
            Err(AuditError::Tampered { line, problem, .. }) => {
                assert_eq!(line, want_line, "problem: {problem}");
                assert!(problem.contains(want), "expected {want:?} in {problem:?}");
            }
            other => panic!("expected tampering at line {want_line}, got {other:?}"),
        }
    }

    #[test]
    fn appends_chain_and_verify() {
        let (_dir, log) = log_with(5);
        let text = lines(&log);
        assert_eq!(text.len(), 5);
        let first: serde_json::Value = serde_json::from_str(&text[0]).unwrap();
        assert_eq!(first["prev"], ZERO_HASH);
        assert_eq!(first["seq"], 1);
        for pair in text.windows(2) {
            let next: serde_json::Value = serde_json::from_str(&pair[1]).unwrap();
            assert_eq!(next["prev"], line_hash(pair[0].as_bytes()));
        }
        let verified = verify(&log, &[]).unwrap();
        assert_eq!(verified.entries, 5);
        let head = verified.head.unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(head.hash, line_hash(text[4].as_bytes()));
        let stored: Head =
            serde_json::from_str(&std::fs::read_to_string(head_path(&log)).unwrap()).unwrap();
        assert_eq!(stored, head);
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, log) = log_with(1);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(&head_path(&log)), 0o600);
        assert_eq!(mode(log.parent().unwrap()), 0o700);
    }

    #[test]
    fn an_edited_field_is_caught() {
        let (_dir, log) = log_with(5);
        let mut text = lines(&log);
        text[2] = text[2].replace("\"n\":3", "\"n\":33");
        rewrite(&log, &text);
        assert_tampered(&log, 3, "changed after it was written");
    }

    #[test]
    fn an_edited_last_line_is_caught_by_the_head() {
        let (_dir, log) = log_with(4);
        let mut text = lines(&log);
        text[3] = text[3].replace("\"action\":\"test\"", "\"action\":\"nothing\"");
        rewrite(&log, &text);
        assert_tampered(&log, 4, "does not match the head");
    }

    #[test]
    fn a_deleted_line_is_caught() {
        let (_dir, log) = log_with(5);
        let mut text = lines(&log);
        text.remove(1);
        rewrite(&log, &text);
        assert_tampered(&log, 2, "entry 3 follows entry 1: 1 entry was removed");
    }

    #[test]
    fn a_deleted_first_line_is_caught() {
        let (_dir, log) = log_with(3);
        let mut text = lines(&log);
        text.remove(0);
        rewrite(&log, &text);
        assert_tampered(&log, 1, "starts at entry 2");
    }

    #[test]
    fn swapped_lines_are_caught() {
        let (_dir, log) = log_with(5);
        let mut text = lines(&log);
        text.swap(1, 2);
        rewrite(&log, &text);
        assert_tampered(&log, 2, "entry 3 follows entry 1");
    }

    #[test]
    fn a_forged_line_is_caught() {
        let (_dir, log) = log_with(5);
        let mut text = lines(&log);
        // A careful forger: the right number and the right `prev` for its place.
        let forged = serde_json::json!({
            "seq": 3, "prev": line_hash(text[1].as_bytes()), "action": "forged", "n": 99
        })
        .to_string();
        text.insert(2, forged);
        rewrite(&log, &text);
        assert_tampered(&log, 4, "entry 3 follows entry 3");
        // A naive one: a copy of an existing line.
        let (_dir2, log2) = log_with(5);
        let mut text = lines(&log2);
        text.insert(4, text[1].clone());
        rewrite(&log2, &text);
        assert_tampered(&log2, 5, "entry 2 follows entry 4");
    }

    #[test]
    fn a_truncated_tail_is_caught_by_the_head() {
        let (_dir, log) = log_with(6);
        let text = lines(&log);
        rewrite(&log, &text[..4]);
        assert_tampered(&log, 5, "2 entries were removed from the end");
        // Cut in the middle of a line.
        let (_dir2, log2) = log_with(3);
        let bytes = std::fs::read(&log2).unwrap();
        std::fs::write(&log2, &bytes[..bytes.len() - 10]).unwrap();
        assert_tampered(&log2, 3, "not a valid audit entry");
    }

    #[test]
    fn a_truncated_tail_without_head_is_caught() {
        let (_dir, log) = log_with(3);
        let text = lines(&log);
        rewrite(&log, &text[..2]);
        std::fs::remove_file(head_path(&log)).unwrap();
        assert_tampered(&log, 2, "head file");
        // An emptied log whose head remains.
        let (_dir2, log2) = log_with(2);
        std::fs::write(&log2, "").unwrap();
        assert_tampered(&log2, 1, "2 entries were removed");
        std::fs::remove_file(&log2).unwrap();
        assert_tampered(&log2, 1, "the log is gone");
    }

    #[test]
    fn an_appended_line_outside_the_head_is_caught() {
        let (_dir, log) = log_with(2);
        let head = std::fs::read(head_path(&log)).unwrap();
        add(&log, 3);
        std::fs::write(head_path(&log), head).unwrap();
        assert_tampered(&log, 3, "not covered by the head");
    }

    #[test]
    fn anchors_catch_a_full_rewrite() {
        let (_dir, log) = log_with(3);
        let anchor = verify(&log, &[]).unwrap().head.unwrap();
        let anchor = Anchor {
            seq: anchor.seq,
            hash: anchor.hash,
        };
        assert!(verify(&log, std::slice::from_ref(&anchor)).is_ok());
        // Someone with write access rewrites everything consistently.
        std::fs::remove_file(&log).unwrap();
        std::fs::remove_file(head_path(&log)).unwrap();
        for i in 1..=4 {
            add(&log, 100 + i);
        }
        assert!(
            verify(&log, &[]).is_ok(),
            "a full rewrite passes on its own"
        );
        match verify(&log, &[anchor]) {
            Err(AuditError::Tampered {
                line: 3, problem, ..
            }) => {
                assert!(problem.contains("anchor"), "{problem}")
            }
            other => panic!("{other:?}"),
        }
        assert!("3:zz".parse::<Anchor>().is_err());
        assert!(format!("2:{}", "A".repeat(64)).parse::<Anchor>().is_ok());
    }

    #[test]
    fn a_missing_log_is_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        assert!(matches!(verify(&log, &[]), Err(AuditError::Missing { .. })));
        std::fs::write(&log, "").unwrap();
        assert_eq!(verify(&log, &[]).unwrap().entries, 0);
    }

    #[test]
    fn an_incomplete_last_line_stops_appends() {
        let (_dir, log) = log_with(2);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"seq\":3,").unwrap();
        let err = append(&log, |_, _| Ok("{}".into())).unwrap_err();
        assert!(matches!(err, AuditError::Unusable { .. }), "{err:?}");
        assert!(err.to_string().contains("incomplete line"), "{err}");
    }

    #[test]
    fn long_lines_are_found_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let big = "x".repeat(20_000);
        for _ in 0..3 {
            append(&log, |seq, prev| {
                Ok(serde_json::json!({"seq": seq, "prev": prev, "pad": big}).to_string())
            })
            .unwrap();
        }
        assert_eq!(verify(&log, &[]).unwrap().entries, 3);
    }

    #[test]
    fn concurrent_writers_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        add(&log, t * 1000 + i);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let verified = verify(&log, &[]).unwrap();
        assert_eq!(verified.entries, 200);
        assert_eq!(lines(&log).len(), 200);
    }
}
