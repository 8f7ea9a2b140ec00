//! External file-system test suites we did not write, run against a mounted
//! file system: pjdfstest (POSIX semantics, the Rust port, crates.io
//! `pjdfstest` 0.2.2) and fsx (random read/write/truncate/mmap with data
//! verification, crates.io `fsx` 0.3.2). `scripts/setup.sh` installs both
//! into `~/.cargo/bin`; `scripts/conformance.sh` runs them on keybound and on
//! gocryptfs side by side.
//!
//! Standalone (std, libc, tempfile): include it from an integration test with
//!
//! ```ignore
//! #[path = "common/suites.rs"]
//! mod suites;
//! ```
//!
//! Facts these helpers rely on (read in the tools' sources, checked on a
//! gocryptfs 2.3 mount):
//!
//! - `pjdfstest -c CONFIG -p DIR [PATTERN…]` runs every test whose name
//!   contains a pattern (`-e` matches exactly, but against the untrimmed
//!   name `pjdfstest::tests::mkdir::…`). It needs root for the tests that
//!   switch users, and a mount with `allow_other` + `default_permissions`;
//!   every directory above the mount point must be searchable by the two
//!   dummy users. It prints one line per test, `NAME<spaces>ok`, `FAILED`,
//!   `skipped`, `failed as expected` or `PASSED UNEXPECTEDLY`, then tab-
//!   indented details (skip reasons, the panic message, whose later lines
//!   are space-indented), and finally
//!   `Summary: F failed, S skipped, P passed, E expected failures, T total`
//!   (F counts unexpected passes too). Exit status 1 when anything failed.
//!   Colours only on a terminal (or `CLICOLOR_FORCE`); backtraces only with
//!   `RUST_BACKTRACE`.
//! - `fsx [-v] [-f CONFIG.toml] -N OPS -S SEED -P ARTIFACTS_DIR FILE`: mmap
//!   reads and writes are on by default; the other operations are weights in
//!   the TOML config. It prints `All operations completed A-OK!` on stdout
//!   and exits 0; a miscompare or size error prints `[ERROR fsx] …` lines,
//!   `Using seed N`, `LOG DUMP` (the last 1024 operations, numbered) on
//!   stderr, writes `FILE.fsxgood` into the artifacts dir, exits 1. An
//!   unexpected errno (EIO, EOPNOTSUPP…) is a panic: exit 101,
//!   `thread 'main' … panicked at …` then `called Result::unwrap() on an Err
//!   value: EIO`. With `-v` every operation is logged at INFO before it runs
//!   (`[INFO  fsx] 42 write 0x… .. 0x… (0x… bytes)`), which is how
//!   [`run_fsx`] knows how far a run got.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---- finding the tools ------------------------------------------------------------

/// Path of an external tool: `$ENV_VAR` if set, else the first `name` on
/// PATH, else `~/.cargo/bin/name` (where `cargo install` puts it, and which
/// is not on every PATH). Panics with the fix when the tool is missing.
pub fn tool_path(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        dirs.push(home.join("bin"));
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if let Ok(meta) = fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return candidate;
        }
    }
    panic!(
        "{name} not found (PATH, ~/.cargo/bin, ${env_var}): run scripts/setup.sh, \
         or `cargo install --locked {name}`"
    );
}

/// Whether `tool_path` would find the tool (for tests that skip without it).
pub fn tool_available(name: &str, env_var: &str) -> bool {
    std::panic::catch_unwind(|| tool_path(name, env_var)).is_ok()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---- running a child with a time limit ----------------------------------------------

struct Finished {
    /// Exit code; None when killed by a signal (or by our timeout).
    code: Option<i32>,
    timed_out: bool,
    elapsed: Duration,
}

/// Wait for `child`, killing it after `timeout`.
fn wait_with_timeout(
    child: &mut std::process::Child,
    start: Instant,
    timeout: Duration,
) -> Finished {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Finished {
                    code: status.code(),
                    timed_out: false,
                    elapsed: start.elapsed(),
                };
            }
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Finished {
                    code: None,
                    timed_out: true,
                    elapsed: start.elapsed(),
                };
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for a child process: {e}"),
        }
    }
}

fn read_all_in_thread(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Remove ANSI colour sequences (ESC [ … letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---- pjdfstest ------------------------------------------------------------------------

/// What goes into pjdfstest's TOML configuration.
#[derive(Debug, Clone)]
pub struct PjdConfig {
    /// Opt-in features (`pjdfstest -l` lists them). Default: what a FUSE
    /// file system on Linux is expected to offer, as pjdfstest's own
    /// `ci/linux-ext4.toml` plus `rename_ctime` (ext4 updates ctime on
    /// rename, and so should we): posix_fallocate, utime_now, utimensat,
    /// rename_ctime. Without a feature its tests are skipped, not failed.
    pub features: Vec<String>,
    /// Sleep between changes, seconds; above the timestamp granularity.
    pub naptime: f64,
    /// Two (user, group) pairs the suite switches to; the user's primary
    /// group must be that group. Default nobody/nogroup and daemon/daemon
    /// (both exist on Debian; pjdfstest's default "tests" user does not).
    pub dummy_users: [(String, String); 2],
    /// A directory on another file system, for the EXDEV tests of link and
    /// rename. `None` = `WORKDIR/pjdfstest-secondary` (created), which is on
    /// the disk while the suite runs on the mount.
    pub secondary_fs: Option<PathBuf>,
    /// Test names expected to fail: they count as "expected failures".
    pub expected_failures: Vec<String>,
    /// Only tests whose name contains one of these (all when empty).
    pub patterns: Vec<String>,
    /// Kill pjdfstest after this long (a hung file system would hang it).
    pub timeout: Duration,
}

impl Default for PjdConfig {
    fn default() -> Self {
        PjdConfig {
            features: ["posix_fallocate", "utime_now", "utimensat", "rename_ctime"]
                .map(String::from)
                .to_vec(),
            naptime: 0.01,
            dummy_users: [
                ("nobody".into(), "nogroup".into()),
                ("daemon".into(), "daemon".into()),
            ],
            secondary_fs: None,
            expected_failures: Vec::new(),
            patterns: Vec::new(),
            timeout: Duration::from_secs(600),
        }
    }
}

impl PjdConfig {
    /// The configuration file's text, with `secondary` as the EXDEV directory.
    pub fn to_toml(&self, secondary: &Path) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut t = String::from("# written by tests/common/suites.rs\n[features]\n");
        for f in &self.features {
            let _ = writeln!(t, "{f} = {{}}");
        }
        let _ = writeln!(t, "secondary_fs = {}", q(&secondary.to_string_lossy()));
        let _ = writeln!(
            t,
            "\n[settings]\nnaptime = {:?}\nallow_remount = false",
            self.naptime
        );
        let failures: Vec<String> = self.expected_failures.iter().map(|s| q(s)).collect();
        let _ = writeln!(t, "expected_failures = [{}]", failures.join(", "));
        let users: Vec<String> = self
            .dummy_users
            .iter()
            .map(|(u, g)| format!("[{}, {}]", q(u), q(g)))
            .collect();
        let _ = writeln!(t, "\n[dummy_auth]\nentries = [{}]", users.join(", "));
        t
    }
}

/// Counts and failures of one pjdfstest run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PjdSummary {
    pub passed: usize,
    /// Failed tests, unexpected passes included (as pjdfstest counts).
    pub failed: usize,
    pub skipped: usize,
    pub expected_failures: usize,
    pub total: usize,
    /// Names of the failed tests (and unexpected passes), in output order.
    pub failures: Vec<String>,
    /// Name → indented detail lines pjdfstest printed under it (the panic
    /// message of a failure, the reason for a skip).
    pub details: BTreeMap<String, String>,
    /// Whether the closing "Summary:" line was there (else the counts are
    /// tallied from the per-test lines, and the run did not finish).
    pub complete: bool,
    /// pjdfstest's exit code (None: killed, e.g. by the timeout).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// Everything pjdfstest printed: stdout, then stderr after a marker line.
    pub raw_output: String,
}

impl PjdSummary {
    /// One line for logs and tables: "382 passed, 2 failed, 14 skipped".
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        );
        if self.expected_failures > 0 {
            let _ = write!(s, ", {} expected failures", self.expected_failures);
        }
        if !self.complete {
            s.push_str(" (incomplete: no Summary line)");
        }
        s
    }

    /// The failures with their messages, for an assertion message.
    pub fn failure_report(&self) -> String {
        let mut s = String::new();
        for name in &self.failures {
            let _ = writeln!(s, "{name}");
            if let Some(d) = self.details.get(name) {
                for l in d.lines() {
                    let _ = writeln!(s, "    {l}");
                }
            }
        }
        s
    }
}

const PJD_STATUSES: [&str; 5] = [
    "ok",
    "FAILED",
    "skipped",
    "failed as expected",
    "PASSED UNEXPECTEDLY",
];

/// A per-test result line: `NAME<spaces>STATUS` (name has no spaces, starts
/// the line).
fn pjd_result_line(line: &str) -> Option<(&str, &'static str)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let line = line.trim_end();
    for status in PJD_STATUSES {
        if let Some(head) = line.strip_suffix(status)
            && head.ends_with(' ')
        {
            let name = head.trim_end();
            if !name.is_empty() && !name.contains(char::is_whitespace) {
                return Some((name, status));
            }
        }
    }
    None
}

/// `Summary: 2 failed, 14 skipped, 382 passed, 0 expected failures, 398 total`
fn pjd_summary_line(line: &str) -> Option<[usize; 5]> {
    let rest = line.trim().strip_prefix("Summary:")?;
    let mut out = [0usize; 5]; // failed, skipped, passed, expected, total
    let mut seen = [false; 5];
    for part in rest.split(',') {
        let part = part.trim();
        let (num, what) = part.split_once(' ')?;
        let n: usize = num.parse().ok()?;
        let i = match what.trim() {
            "failed" => 0,
            "skipped" => 1,
            "passed" => 2,
            "expected failures" => 3,
            "total" => 4,
            _ => continue,
        };
        out[i] = n;
        seen[i] = true;
    }
    (seen[0] && seen[1] && seen[2]).then_some(out)
}

/// Parse pjdfstest's output (colours allowed). Fills everything but
/// exit_code, timed_out, elapsed.
pub fn parse_pjdfstest_output(output: &str) -> PjdSummary {
    let text = strip_ansi(output);
    let mut s = PjdSummary {
        raw_output: output.to_string(),
        ..Default::default()
    };
    let (mut pass, mut fail, mut skip, mut xfail) = (0, 0, 0, 0);
    let mut current: Option<String> = None;
    let mut detail = String::new();
    let flush = |current: &mut Option<String>, detail: &mut String, s: &mut PjdSummary| {
        if let Some(name) = current.take()
            && !detail.trim().is_empty()
        {
            s.details.insert(name, detail.trim_end().to_string());
        }
        detail.clear();
    };
    for line in text.lines() {
        if let Some((name, status)) = pjd_result_line(line) {
            flush(&mut current, &mut detail, &mut s);
            match status {
                "ok" => pass += 1,
                "skipped" => skip += 1,
                "failed as expected" => xfail += 1,
                _ => {
                    fail += 1;
                    s.failures.push(name.to_string());
                }
            }
            current = Some(name.to_string());
        } else if let Some([f, sk, p, x, t]) = pjd_summary_line(line) {
            flush(&mut current, &mut detail, &mut s);
            s.failed = f;
            s.skipped = sk;
            s.passed = p;
            s.expected_failures = x;
            s.total = t;
            s.complete = true;
        } else if line.starts_with("Backtrace:") {
            // The rest of this block is a backtrace: keep it out of details.
            flush(&mut current, &mut detail, &mut s);
        } else if current.is_some() && !line.trim().is_empty() {
            let l = line.strip_prefix('\t').unwrap_or(line);
            detail.push_str(l);
            detail.push('\n');
        }
    }
    flush(&mut current, &mut detail, &mut s);
    if !s.complete {
        s.passed = pass;
        s.failed = fail;
        s.skipped = skip;
        s.expected_failures = xfail;
        s.total = pass + fail + skip + xfail;
    }
    s
}

/// Every directory from `/` to `dir` (included) must be searchable by the
/// dummy users.
fn check_searchable_by_others(dir: &Path) {
    let dir = fs::canonicalize(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for anc in dir.ancestors() {
        let mode = fs::metadata(anc)
            .unwrap_or_else(|e| panic!("{}: {e}", anc.display()))
            .permissions()
            .mode();
        assert!(
            mode & 0o001 != 0,
            "pjdfstest switches to unprivileged users, who cannot reach {}: {} has mode {:o}. \
             Mount under a directory with mode 0755 (tempfile::TempDir is 0700: chmod it)",
            dir.display(),
            anc.display(),
            mode & 0o7777
        );
    }
}

/// Run the whole pjdfstest suite with the default configuration (see
/// [`PjdConfig`]) on the file system mounted at `mountpoint`. `workdir`
/// (anywhere off the mount) receives the config file and the EXDEV
/// directory. Run as root on a mount with allow_other + default_permissions.
/// About 3 s on gocryptfs: 382 passed, 2 failed, 14 skipped (the 13
/// `erofs` tests need remounts, `link_count_max` an unknown LINK_MAX).
pub fn run_pjdfstest(mountpoint: &Path, workdir: &Path) -> PjdSummary {
    run_pjdfstest_with(mountpoint, workdir, &PjdConfig::default())
}

/// [`run_pjdfstest`] with a configuration of one's own.
pub fn run_pjdfstest_with(mountpoint: &Path, workdir: &Path, config: &PjdConfig) -> PjdSummary {
    let bin = tool_path("pjdfstest", "PJDFSTEST");
    check_searchable_by_others(mountpoint);
    fs::create_dir_all(workdir).unwrap_or_else(|e| panic!("{}: {e}", workdir.display()));
    let secondary = match &config.secondary_fs {
        Some(p) => p.clone(),
        None => {
            let p = workdir.join("pjdfstest-secondary");
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            // The dummy users reach it too (EXDEV tests run as root, but keep it open).
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
            p
        }
    };
    let conf_path = workdir.join("pjdfstest.toml");
    fs::write(&conf_path, config.to_toml(&secondary))
        .unwrap_or_else(|e| panic!("{}: {e}", conf_path.display()));

    let start = Instant::now();
    let mut child = Command::new(&bin)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(mountpoint)
        .args(&config.patterns)
        .current_dir(workdir)
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let out = read_all_in_thread(child.stdout.take().unwrap());
    let err = read_all_in_thread(child.stderr.take().unwrap());
    let fin = wait_with_timeout(&mut child, start, config.timeout);
    let mut raw = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !err.is_empty() {
        raw.push_str("\n--- stderr ---\n");
        raw.push_str(&err);
    }
    let mut summary = parse_pjdfstest_output(&raw);
    summary.exit_code = fin.code;
    summary.timed_out = fin.timed_out;
    summary.elapsed = fin.elapsed;
    summary
}

// ---- fsx ------------------------------------------------------------------------------

/// fsx's TOML configuration (see fsx's doc/fsx.toml). The default suits a
/// FUSE file system on Linux: every operation fsx has except hole punching
/// (gocryptfs answers EOPNOTSUPP, and so may we), with mmap reads and
/// writes as often as plain ones.
#[derive(Debug, Clone)]
pub struct FsxConfig {
    /// Largest file size, bytes (fsx's default 256 KiB).
    pub flen: u32,
    pub opsize_max: u32,
    pub opsize_min: u32,
    pub align: u32,
    /// (operation, weight) pairs, written as `[weights]`.
    pub weights: Vec<(&'static str, f64)>,
    /// Kill fsx after this long.
    pub timeout: Duration,
}

impl Default for FsxConfig {
    fn default() -> Self {
        FsxConfig {
            flen: 256 * 1024,
            opsize_max: 65536,
            opsize_min: 0,
            align: 1,
            weights: vec![
                ("read", 10.0),
                ("write", 10.0),
                ("mapread", 10.0),
                ("mapwrite", 10.0),
                ("truncate", 5.0),
                ("close_open", 1.0),
                ("invalidate", 1.0),
                ("fsync", 1.0),
                ("fdatasync", 1.0),
                ("posix_fallocate", 1.0),
                ("punch_hole", 0.0),
                ("sendfile", 1.0),
                ("posix_fadvise", 1.0),
                ("copy_file_range", 1.0),
            ],
            timeout: Duration::from_secs(4 * 3600),
        }
    }
}

impl FsxConfig {
    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "# written by tests/common/suites.rs\nflen = {}\n\n[opsize]\nmax = {}\nmin = {}\nalign = {}\n\n[weights]\n",
            self.flen, self.opsize_max, self.opsize_min, self.align
        );
        for (op, w) in &self.weights {
            let _ = writeln!(t, "{op} = {w:?}");
        }
        t
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FsxOutcome {
    /// fsx exited 0 and said "All operations completed A-OK!".
    pub ok: bool,
    /// Operations completed without error (all of them when ok).
    pub ops_done: u64,
    /// The operation during which the failure showed (None when ok, or
    /// when fsx died before its first operation).
    pub failed_at: Option<u64>,
    /// The first error line: "Size error: …", "miscompare: …", the panic's
    /// errno ("called `Result::unwrap()` on an `Err` value: EIO"), …
    pub failure: Option<String>,
    pub seed: u64,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// Where fsx left FILE.fsxgood and our config (kept only on failure).
    pub artifacts_dir: Option<PathBuf>,
    /// fsx's output, stdout then stderr, without the per-operation INFO
    /// lines (1M operations log 1M lines) except, after a failure, the last 40.
    pub output: String,
}

impl FsxOutcome {
    pub fn line(&self) -> String {
        if self.ok {
            format!(
                "{} ops OK in {:.1?} (seed {})",
                self.ops_done, self.elapsed, self.seed
            )
        } else {
            format!(
                "FAILED at op {} after {} ops OK in {:.1?} (seed {}): {}",
                self.failed_at.map_or("?".to_string(), |n| n.to_string()),
                self.ops_done,
                self.elapsed,
                self.seed,
                self.failure.as_deref().unwrap_or("(no message)")
            )
        }
    }
}

/// What the stderr reader thread accumulates.
#[derive(Default)]
struct FsxLog {
    last_info_step: Option<u64>,
    tail: std::collections::VecDeque<String>,
    other: Vec<String>,
    lines: u64,
}

const FSX_TAIL: usize = 40;

/// `[INFO  fsx]  42 write …` → (level, 42)
fn fsx_log_line(line: &str) -> Option<(&str, Option<u64>)> {
    let rest = line.strip_prefix('[')?;
    let (head, msg) = rest.split_once(']')?;
    let level = head.split_whitespace().next()?;
    let step = msg.split_whitespace().next().and_then(|w| w.parse().ok());
    Some((level, step))
}

/// Parse a finished fsx run: its stdout and (filtered) stderr, exit code,
/// the number of operations asked for and the last step logged at INFO.
pub fn parse_fsx_output(
    stdout: &str,
    stderr: &str,
    exit_code: Option<i32>,
    ops: u64,
    last_info_step: Option<u64>,
) -> FsxOutcome {
    let ok = exit_code == Some(0) && stdout.contains("All operations completed A-OK!");
    let mut out = FsxOutcome {
        ok,
        exit_code,
        ..Default::default()
    };
    let mut output = stdout.to_string();
    if !stderr.is_empty() {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(stderr);
    }
    out.output = output;
    if ok {
        out.ops_done = ops;
        return out;
    }
    // The step that failed: the last one numbered in the LOG DUMP (fsx's
    // miscompare/size-error path), else the last one logged at INFO (a
    // panic happens inside the operation it announced).
    let mut in_dump = false;
    let mut dump_last = None;
    let mut failure = None;
    let mut lines = stderr.lines().chain(stdout.lines()).peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if let Some((level, step)) = fsx_log_line(trimmed) {
            let msg = trimmed.split_once(']').map_or("", |(_, m)| m.trim());
            if msg == "LOG DUMP" {
                in_dump = true;
            } else if in_dump {
                if let Some(n) = step {
                    dump_last = Some(n);
                }
            } else if level == "ERROR" && failure.is_none() && !msg.starts_with("Using seed") {
                failure = Some(msg.to_string());
            }
        } else if trimmed.contains("panicked at") {
            // The message is on the next line.
            if let Some(next) = lines.peek() {
                failure.get_or_insert_with(|| next.trim().to_string());
            }
        } else if (trimmed.starts_with("Test file system does not support")
            || trimmed.contains("unexpectedly failed with")
            || trimmed.starts_with("error:")
            || trimmed.starts_with("Error reading config file"))
            && failure.is_none()
        {
            failure = Some(trimmed.to_string());
        }
    }
    out.failed_at = dump_last.or(last_info_step);
    out.ops_done = out.failed_at.map_or(0, |n| n.saturating_sub(1));
    out.failure = failure.or_else(|| {
        if exit_code.is_none() {
            Some("fsx was killed (timeout or signal)".to_string())
        } else {
            Some(format!("fsx exited with status {exit_code:?}"))
        }
    });
    out
}

/// Run fsx for `ops` operations with `seed` on `file` (created; its
/// directory must exist), with the default [`FsxConfig`]. 100k operations
/// take about 40 s on gocryptfs here.
pub fn run_fsx(file: &Path, ops: u64, seed: u64) -> FsxOutcome {
    run_fsx_with(file, ops, seed, &FsxConfig::default())
}

/// [`run_fsx`] with a configuration of one's own.
pub fn run_fsx_with(file: &Path, ops: u64, seed: u64, config: &FsxConfig) -> FsxOutcome {
    let bin = tool_path("fsx", "FSX");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let artifacts = std::env::temp_dir().join(format!(
        "keybound-fsx-{}-{seed}-{nanos}",
        std::process::id()
    ));
    fs::create_dir_all(&artifacts).unwrap_or_else(|e| panic!("{}: {e}", artifacts.display()));
    let conf_path = artifacts.join("fsx.toml");
    fs::write(&conf_path, config.to_toml()).expect("write fsx.toml");

    let start = Instant::now();
    let mut child = Command::new(&bin)
        .arg("-v")
        .arg("-f")
        .arg(&conf_path)
        .arg("-N")
        .arg(ops.to_string())
        .arg("-S")
        .arg(seed.to_string())
        .arg("-P")
        .arg(&artifacts)
        .arg(file)
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let out = read_all_in_thread(child.stdout.take().unwrap());
    let log = Arc::new(Mutex::new(FsxLog::default()));
    let reader = {
        let log = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                let mut l = log.lock().unwrap();
                l.lines += 1;
                match fsx_log_line(&line) {
                    Some(("INFO", step)) => {
                        if step.is_some() {
                            l.last_info_step = step;
                        }
                        if l.tail.len() == FSX_TAIL {
                            l.tail.pop_front();
                        }
                        l.tail.push_back(line);
                    }
                    _ => l.other.push(line),
                }
            }
        })
    };
    let fin = wait_with_timeout(&mut child, start, config.timeout);
    let _ = reader.join();
    let stdout = out.join().unwrap_or_default();
    let mut log = std::mem::take(&mut *log.lock().unwrap());
    // The last INFO lines show what led to a failure; after a success they
    // are noise.
    let succeeded = fin.code == Some(0) && stdout.contains("All operations completed A-OK!");
    let tail: &[String] = if succeeded {
        &[]
    } else {
        log.tail.make_contiguous()
    };
    let mut stderr = String::new();
    let kept = (tail.len() + log.other.len()) as u64;
    if log.lines > kept {
        let _ = writeln!(
            stderr,
            "[… {} per-operation INFO lines left out …]",
            log.lines - kept
        );
    }
    for l in tail.iter().chain(log.other.iter()) {
        stderr.push_str(l);
        stderr.push('\n');
    }
    let mut outcome = parse_fsx_output(&stdout, &stderr, fin.code, ops, log.last_info_step);
    outcome.seed = seed;
    outcome.timed_out = fin.timed_out;
    outcome.elapsed = fin.elapsed;
    if outcome.ok {
        let _ = fs::remove_dir_all(&artifacts);
    } else {
        outcome.artifacts_dir = Some(artifacts);
    }
    outcome
}

// ---- gocryptfs, the peer ------------------------------------------------------------

/// A gocryptfs file system mounted for a test (as pjdfstest wants it:
/// `-allow_other`, which also turns on default_permissions). Unmounted on drop.
pub struct Gocryptfs {
    pub cipherdir: PathBuf,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    mounted: bool,
}

impl Gocryptfs {
    /// `gocryptfs -init` a new cipher dir under `base` (with `-scryptn 10`,
    /// fast) and mount it on `base/mnt`. `base` must be searchable by other
    /// users if pjdfstest is to run there.
    pub fn init_and_mount(base: &Path) -> Self {
        let cipherdir = base.join("cipher");
        let mountpoint = base.join("mnt");
        let passfile = base.join("gocryptfs.pass");
        let log = base.join("gocryptfs.log");
        fs::create_dir_all(&cipherdir).unwrap();
        fs::create_dir_all(&mountpoint).unwrap();
        fs::write(&passfile, "keybound-test-password\n").unwrap();
        fs::set_permissions(&passfile, fs::Permissions::from_mode(0o600)).unwrap();
        // Output to a file, never a pipe: the mount daemonises, and its
        // child would hold a pipe open forever.
        let run = |args: &[&std::ffi::OsStr], what: &str| {
            let file = fs::File::create(&log).unwrap();
            let status = Command::new("gocryptfs")
                .args(args)
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .status()
                .unwrap_or_else(|e| panic!("run gocryptfs (apt install gocryptfs): {e}"));
            assert!(
                status.success(),
                "gocryptfs {what} failed ({status}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        };
        run(
            &[
                "-q".as_ref(),
                "-init".as_ref(),
                "-scryptn".as_ref(),
                "10".as_ref(),
                "-passfile".as_ref(),
                passfile.as_os_str(),
                cipherdir.as_os_str(),
            ],
            "-init",
        );
        run(
            &[
                "-q".as_ref(),
                "-nosyslog".as_ref(),
                "-allow_other".as_ref(),
                "-passfile".as_ref(),
                passfile.as_os_str(),
                cipherdir.as_os_str(),
                mountpoint.as_os_str(),
            ],
            "mount",
        );
        Gocryptfs {
            cipherdir,
            mountpoint,
            log,
            mounted: true,
        }
    }

    pub fn unmount(&mut self) {
        if !std::mem::take(&mut self.mounted) {
            return;
        }
        for args in [&["-u"][..], &["-u", "-z"][..]] {
            let ok = Command::new("fusermount3")
                .args(args)
                .arg(&self.mountpoint)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
        }
    }
}

impl Drop for Gocryptfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

// ---- parser tests on captured real output ---------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// pjdfstest 0.2.2 on gocryptfs 2.3 (RUST_BACKTRACE=0, no terminal):
    /// the beginning, both failures, some skips, the end (lines verbatim,
    /// the ok lines in between left out).
    const PJD_GOCRYPTFS: &str = "\
unlink::unchanged_ctime_failed::char                                          ok
unlink::unchanged_ctime_failed::block                                         ok
unlink::update_ctime_success::fifo                                            ok
unlink::erofs_named                                                      skipped
\tRemounts (allow_remount) are not allowed in the configuration file
link::link_count_max                                                     skipped
\tCannot get value for LINK_MAX: filesystem limit is unknown
utimensat::follow_symlink                                                 FAILED
\tassertion `left == right` failed
  left: TimeSpec(timespec { tv_sec: 1960000000, tv_nsec: 0 })
 right: TimeSpec(timespec { tv_sec: 1795443042, tv_nsec: 485769380 })
truncate::erofs_named                                                    skipped
\tRemounts (allow_remount) are not allowed in the configuration file
mkdir::permission_bits_from_mode                                          FAILED
\tassertion `left == right` failed
  left: 489
 right: 105
mkdir::erofs_new_file                                                    skipped
\tRemounts (allow_remount) are not allowed in the configuration file
chown::erofs_named                                                       skipped
\tRemounts (allow_remount) are not allowed in the configuration file
chown::lchown::symlink_in_path                                                ok

Summary: 2 failed, 14 skipped, 382 passed, 0 expected failures, 398 total
--- stderr ---
Error: Some tests have failed
";

    #[test]
    fn pjdfstest_summary_and_failures() {
        let s = parse_pjdfstest_output(PJD_GOCRYPTFS);
        assert!(s.complete);
        assert_eq!((s.passed, s.failed, s.skipped, s.total), (382, 2, 14, 398));
        assert_eq!(s.expected_failures, 0);
        assert_eq!(
            s.failures,
            [
                "utimensat::follow_symlink",
                "mkdir::permission_bits_from_mode"
            ]
        );
        assert_eq!(
            s.details["mkdir::permission_bits_from_mode"],
            "assertion `left == right` failed\n  left: 489\n right: 105"
        );
        assert_eq!(
            s.details["link::link_count_max"],
            "Cannot get value for LINK_MAX: filesystem limit is unknown"
        );
        assert!(!s.details.contains_key("unlink::update_ctime_success::fifo"));
        assert_eq!(s.line(), "382 passed, 2 failed, 14 skipped");
        assert!(s.failure_report().contains("    left: 489"));
    }

    #[test]
    fn pjdfstest_without_summary_is_tallied_and_incomplete() {
        // A run cut short (the file system hung and the timeout killed it).
        let cut = PJD_GOCRYPTFS.split("\nSummary").next().unwrap();
        let s = parse_pjdfstest_output(cut);
        assert!(!s.complete);
        assert_eq!((s.passed, s.failed, s.skipped), (4, 2, 5));
        assert_eq!(s.total, 11);
        assert!(s.line().contains("incomplete"));
    }

    #[test]
    fn pjdfstest_colours_backtraces_and_expected_failures() {
        // CLICOLOR_FORCE=1 output, then a failure with RUST_BACKTRACE=1 and
        // the two expected-failure statuses.
        let out = "\
\u{1b}[34munlink::unchanged_ctime_failed::char                                         \u{1b}[0m \u{1b}[32mok\u{1b}[0m
\u{1b}[34mchmod::erofs_named                                                      \u{1b}[0m \u{1b}[33mskipped\u{1b}[0m
\t\u{1b}[33mRemounts (allow_remount) are not allowed in the configuration file\u{1b}[0m
\u{1b}[34mmkdir::permission_bits_from_mode                                         \u{1b}[0m \u{1b}[31mFAILED\u{1b}[0m
\tassertion `left == right` failed
  left: 489
 right: 105
Backtrace:
   0: pjdfstest::main::{{closure}}
   1: std::panicking::panic_with_hook
             at ./csu/../sysdeps/nptl/libc_start_call_main.h:58:16
utimensat::y2038                                             failed as expected
rename::foo                                                  PASSED UNEXPECTEDLY

\u{1b}[1;31mSummary\u{1b}[0m: 2 \u{1b}[1;31mfailed\u{1b}[0m, 1 \u{1b}[1;33mskipped\u{1b}[0m, 1 \u{1b}[1;32mpassed\u{1b}[0m, 1 \u{1b}[1;92mexpected failures\u{1b}[0m, 5 total
";
        let s = parse_pjdfstest_output(out);
        assert!(s.complete);
        assert_eq!(
            (s.passed, s.failed, s.skipped, s.expected_failures, s.total),
            (1, 2, 1, 1, 5)
        );
        assert_eq!(
            s.failures,
            ["mkdir::permission_bits_from_mode", "rename::foo"]
        );
        assert_eq!(
            s.details["mkdir::permission_bits_from_mode"],
            "assertion `left == right` failed\n  left: 489\n right: 105"
        );
        assert_eq!(
            s.details["chmod::erofs_named"],
            "Remounts (allow_remount) are not allowed in the configuration file"
        );
    }

    #[test]
    fn pjdfstest_config_error_has_no_counts() {
        let s = parse_pjdfstest_output(
            "\n--- stderr ---\nError reading config file: No user found for 'tests'\n",
        );
        assert!(!s.complete);
        assert_eq!((s.passed, s.failed, s.skipped, s.total), (0, 0, 0, 0));
    }

    #[test]
    fn pjdfstest_config_text() {
        let t = PjdConfig::default().to_toml(Path::new("/w/second"));
        for want in [
            "[features]\n",
            "posix_fallocate = {}\n",
            "rename_ctime = {}\n",
            "secondary_fs = \"/w/second\"\n",
            "naptime = 0.01\n",
            "expected_failures = []\n",
            "entries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"]]\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        // secondary_fs belongs to [features], before [settings].
        assert!(t.find("secondary_fs").unwrap() < t.find("[settings]").unwrap());
    }

    #[test]
    fn pjdfstest_result_lines() {
        assert_eq!(
            pjd_result_line("rename::changed_ctime_success::dir          ok"),
            Some(("rename::changed_ctime_success::dir", "ok"))
        );
        assert_eq!(pjd_result_line("  left: 489 ok"), None);
        assert_eq!(pjd_result_line("\tRemounts skipped"), None);
        assert_eq!(pjd_result_line("nonsense"), None);
    }

    /// `fsx -v -N 5 -S 7 FILE` on gocryptfs.
    const FSX_OK_STDOUT: &str = "All operations completed A-OK!\n";
    const FSX_OK_STDERR: &str = "\
[INFO  fsx] 1 truncate     0x0 => 0x253bb
[INFO  fsx] 2 read      0x7055 ..  0xbbe0 ( 0x4b8c bytes)
[INFO  fsx] 3 mapwrite 0x39fd3 .. 0x3ffff ( 0x602d bytes)
[INFO  fsx] 4 mapwrite 0x3288d .. 0x3ffff ( 0xd773 bytes)
[INFO  fsx] 5 mapwrite 0x339ce .. 0x3d266 ( 0x9899 bytes)
";

    #[test]
    fn fsx_success() {
        let o = parse_fsx_output(FSX_OK_STDOUT, FSX_OK_STDERR, Some(0), 5, Some(5));
        assert!(o.ok);
        assert_eq!(o.ops_done, 5);
        assert_eq!(o.failed_at, None);
        assert_eq!(o.failure, None);
    }

    /// `fsx -v -N 400 -S 7 --inject 101 -P DIR FILE` on gocryptfs (fsx's
    /// hidden option skips step 101, as a lost write would): the dump, cut.
    const FSX_SIZE_ERROR_STDERR: &str = "\
[INFO  fsx]  98 write    0x39804 .. 0x3ffff ( 0x67fc bytes)
[INFO  fsx]  99 truncate 0x40000 => 0x111fe
[INFO  fsx] 100 read      0xc5e6 .. 0x111fd ( 0x4c18 bytes)
[ERROR fsx] Size error: expected 0x1e6a6 but found 0x111fe by stat and 0x111fe by seek
[ERROR fsx] Using seed 7
[ERROR fsx] LOG DUMP
[ERROR fsx]   1 TRUNCATE  UP   from     0x0 to 0x253bb
[ERROR fsx]   2 READ      0x7055 =>  0xbbe1 ( 0x4b8c bytes)
[ERROR fsx]   3 MAPWRITE 0x39fd3 => 0x40000 ( 0x602d bytes) HOLE
[ERROR fsx]  99 TRUNCATE  DOWN from 0x40000 to 0x111fe
[ERROR fsx] 100 READ      0xc5e6 => 0x111fe ( 0x4c18 bytes)
[ERROR fsx] 101 WRITE    0x1c795 => 0x1e6a6 ( 0x1f11 bytes) HOLE
";

    #[test]
    fn fsx_size_error_with_log_dump() {
        let o = parse_fsx_output("", FSX_SIZE_ERROR_STDERR, Some(1), 400, Some(100));
        assert!(!o.ok);
        assert_eq!(o.failed_at, Some(101));
        assert_eq!(o.ops_done, 100);
        assert_eq!(
            o.failure.as_deref(),
            Some("Size error: expected 0x1e6a6 but found 0x111fe by stat and 0x111fe by seek")
        );
    }

    /// `fsx -v` with punch_hole = 1 on gocryptfs (RUST_BACKTRACE=0): EOPNOTSUPP
    /// is a panic in the operation announced last.
    const FSX_PANIC_STDERR: &str = "\
[INFO  fsx]   10 write    0x4d76 ..  0x6fbd ( 0x2248 bytes)
[INFO  fsx]   11 punch_hole 0x3de3b .. 0x3ffff ( 0x21c5 bytes)

thread 'main' (21136) panicked at /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/fsx-0.3.2/src/main.rs:1691:19:
called `Result::unwrap()` on an `Err` value: EOPNOTSUPP
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace
";

    #[test]
    fn fsx_panic_on_errno() {
        let o = parse_fsx_output("", FSX_PANIC_STDERR, Some(101), 3000, Some(11));
        assert!(!o.ok);
        assert_eq!(o.failed_at, Some(11));
        assert_eq!(o.ops_done, 10);
        assert_eq!(
            o.failure.as_deref(),
            Some("called `Result::unwrap()` on an `Err` value: EOPNOTSUPP")
        );
        assert!(o.line().contains("FAILED at op 11 after 10 ops OK"));
    }

    #[test]
    fn fsx_exit_zero_without_ok_line_is_a_failure() {
        let o = parse_fsx_output("", "", Some(0), 10, None);
        assert!(!o.ok);
        assert_eq!(o.ops_done, 0);
        let killed = parse_fsx_output("", "", None, 10, Some(3));
        assert_eq!(killed.failed_at, Some(3));
        assert!(killed.failure.unwrap().contains("killed"));
    }

    #[test]
    fn fsx_config_text() {
        let t = FsxConfig::default().to_toml();
        for want in [
            "flen = 262144\n",
            "[opsize]\nmax = 65536\n",
            "[weights]\n",
            "mapwrite = 10.0\n",
            "punch_hole = 0.0\n",
            "copy_file_range = 1.0\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\u{1b}[1;31mSummary\u{1b}[0m: 1"), "Summary: 1");
    }
}
