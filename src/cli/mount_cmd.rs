//! `keybound mount` and `keybound unmount` (alias `lock`).
//!
//! `mount` checks everything it can before asking for a secret (FUSE, the
//! container, the mountpoint, which enrolled token is plugged in), asks for
//! the password and the PIN, and then either serves in the foreground (`-f`)
//! or starts itself again as a detached daemon, handing the secrets over
//! through pipes (never argv) and waiting until the daemon reports that the
//! mount is ready, or why it failed.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use keybound::audit::Event;
use keybound::container::{Access, Container, ContainerError};
use keybound::secrets::SecretBytes;
use keybound::session::tether::{LOCK_SIGNAL, LockReason};
use keybound::session::{self, SessionError, daemon, mountpoint, registry, unlock};
use keybound::token::{LastTry, Pin, TokenError, TokenName};

use super::{audit_cmd, exitcodes, prompt};

#[derive(Args)]
pub struct MountArgs {
    /// The container file.
    vault: PathBuf,
    /// An empty directory to mount it on.
    dir: PathBuf,
    /// Use the enrolled token with this serial (needed when several are plugged in).
    #[arg(long)]
    serial: Option<u32>,
    /// Read the vault password from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the token's PIN from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// Stay in the foreground (for systemd and debugging); log to stderr.
    #[arg(short, long)]
    foreground: bool,
    /// Mount read-only: nothing in the container changes.
    #[arg(long)]
    read_only: bool,
    /// Let other users (and root) see into the mount; permissions still apply.
    /// Needs root, or user_allow_other in /etc/fuse.conf.
    #[arg(long)]
    allow_other: bool,
    /// Allow spending the token's last PIN try (a wrong PIN then blocks it).
    #[arg(long)]
    allow_last_pin_try: bool,
    /// Lock after this long without file activity (e.g. 15m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = super::vault_cmd::parse_duration)]
    idle: Option<Duration>,
    /// Wait for an enrolled token to be plugged in before asking for secrets.
    #[arg(long)]
    wait: bool,
    /// Diagnostic only: after locking, keep the (keyless) daemon process alive
    /// until it is killed with SIGKILL, so its memory can be inspected.
    #[arg(long)]
    diagnostic_linger: bool,
    /// Open with the recovery key from FILE (`-` for stdin) instead of a token:
    /// runs in the foreground, untethered, and needs --idle (or a policy default).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["serial", "password_file", "pin_file", "wait"])]
    recovery_key_file: Option<PathBuf>,
    /// Internal: the file descriptor a detached daemon reports readiness on.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
}

#[derive(Args)]
pub struct UnmountArgs {
    /// The mountpoint of a vault.
    dir: PathBuf,
}

#[derive(Args)]
pub struct LockArgs {
    /// The mountpoint of a vault.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    dir: Option<PathBuf>,
    /// Lock every vault mounted by this user (root: every vault).
    #[arg(long)]
    all: bool,
}

/// What the checks before any secret found.
struct Prepared {
    mountpoint: PathBuf,
    choice: unlock::Choice,
}

pub fn mount(mut args: MountArgs) -> Result<()> {
    let ready = args.ready_fd.map(ReadyPipe::from_fd);
    // ---- admin hooks (src/cli/admin_cmd.rs): the vault policy's idle default
    // when --idle is not given, and mounts with the recovery key. ----
    let mut run = || -> Result<()> {
        args.idle = super::admin_cmd::idle_default(&args.vault, args.idle)?;
        if args.recovery_key_file.is_some() {
            return super::admin_cmd::mount_recovery(super::admin_cmd::RecoveryMount {
                vault: &args.vault,
                dir: &args.dir,
                key_file: args.recovery_key_file.as_deref(),
                read_only: args.read_only,
                allow_other: args.allow_other,
                idle: args.idle,
            });
        }
        mount_inner(&args, ready.as_ref())
    };
    // ---- end of admin hooks ----
    match run() {
        Ok(()) => Ok(()),
        Err(err) => {
            if let Some(pipe) = &ready {
                pipe.failed(&err);
            }
            Err(err)
        }
    }
}

fn mount_inner(args: &MountArgs, ready: Option<&ReadyPipe>) -> Result<()> {
    // Audit: a refusal before any secret is asked is a failed `mount`; from
    // the secrets on, a failed `unlock` (the daemon records its own).
    let prepared = prepare(args).inspect_err(|e| {
        audit_cmd::record_failure(mount_event(args, None).field("stage", "check"), e)
    })?;
    if args.foreground || ready.is_some() {
        // The serving process: every page it will ever touch stays in RAM
        // (keys, password, PIN, plaintext), checked before anything is typed.
        keybound::secrets::lock_all_memory()?;
    }
    let serial = prepared.choice.serial;
    let secrets_failed = |e: &anyhow::Error| {
        let event = unlock_event(args, &prepared.choice, None).field("stage", "secrets");
        audit_cmd::record_failure(event, e)
    };
    let password = prompt::secret(
        args.password_file.as_deref(),
        "password",
        &format!("Password for {}: ", args.vault.display()),
        "--password-file",
    )
    .inspect_err(secrets_failed)?;
    let pin = prompt::pin(
        args.pin_file.as_deref(),
        &format!("PIN of token {serial}: "),
    )
    .inspect_err(secrets_failed)?;
    if args.foreground || ready.is_some() {
        serve(args, prepared, password, pin, ready)
    } else {
        spawn_daemon(args, &prepared, password, pin)
    }
}

fn prepare(args: &MountArgs) -> Result<Prepared> {
    session::mountpoint::check_fuse()?;
    let header = Container::inspect(&args.vault)?;
    check_not_mounted(&args.vault)?;
    let mountpoint = mountpoint::check(&args.dir)?;
    let choice = if args.wait && args.ready_fd.is_none() {
        wait_for_token(&args.vault, &header, args.serial)?
    } else {
        unlock::choose_slot(&args.vault, &header, args.serial)?
    };
    // Admin hook: a temporary password (set by an admin) must be changed first.
    super::admin_cmd::check_mountable(&args.vault, &choice.slot)?;
    Ok(Prepared { mountpoint, choice })
}

/// An audit event about the vault of `args`: the container id (read from
/// the header when not given), the key slot and token once chosen.
fn vault_event(
    action: &str,
    args: &MountArgs,
    choice: Option<&unlock::Choice>,
    container_id: Option<&[u8]>,
) -> Event {
    let event = Event::new(action, &args.vault);
    let event = match container_id {
        Some(id) => event.container_id(id),
        None => match Container::inspect(&args.vault) {
            Ok(header) => event.container_id(&header.id),
            Err(_) => event,
        },
    };
    match (choice, args.serial) {
        (Some(c), _) => event.slot(c.slot.index).token(c.serial),
        (None, Some(serial)) => event.token(serial),
        (None, None) => event,
    }
}

fn mount_event(args: &MountArgs, choice: Option<&unlock::Choice>) -> Event {
    vault_event("mount", args, choice, None)
}

fn unlock_event(args: &MountArgs, choice: &unlock::Choice, container_id: Option<&[u8]>) -> Event {
    vault_event("unlock", args, Some(choice), container_id)
}

/// `--wait`: poll until an enrolled token is plugged in. Other errors (pcscd
/// not running, several tokens) are reported at once.
fn wait_for_token(
    vault: &Path,
    header: &keybound::container::HeaderInfo,
    serial: Option<u32>,
) -> Result<unlock::Choice> {
    let mut told = false;
    loop {
        match unlock::choose_slot(vault, header, serial) {
            Ok(choice) => return Ok(choice),
            Err(SessionError::Token(
                TokenError::NoToken | TokenError::NoReader | TokenError::NotFound { .. },
            ))
            | Err(SessionError::TokenNotEnrolled { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if !told {
            eprintln!(
                "Waiting for a token enrolled in {} to be plugged in (Ctrl-C to give up)...",
                vault.display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Refuse early if another daemon holds the vault, naming it.
fn check_not_mounted(vault: &Path) -> Result<()> {
    match Container::open(vault, Access::ReadOnly) {
        Ok(_) => Ok(()),
        Err(e @ ContainerError::Locked { .. }) => Err(already_mounted(vault, e)),
        Err(e) => Err(e.into()),
    }
}

fn already_mounted(vault: &Path, err: ContainerError) -> anyhow::Error {
    let holder = match &err {
        ContainerError::Locked { holder, .. } => *holder,
        _ => None,
    };
    let record =
        registry::find_by_container(vault).or_else(|| holder.and_then(registry::find_by_pid));
    match record {
        Some(r) => SessionError::AlreadyMounted {
            vault: vault.to_path_buf(),
            mountpoint: r.mountpoint.display().to_string(),
            pid: r.pid,
        }
        .into(),
        None => err.into(),
    }
}

fn serve(
    args: &MountArgs,
    prepared: Prepared,
    password: SecretBytes,
    pin: Pin,
    ready: Option<&ReadyPipe>,
) -> Result<()> {
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    };
    let opened = match Container::open(&args.vault, access) {
        Err(e @ ContainerError::Locked { .. }) => Err(already_mounted(&args.vault, e)),
        other => other.map_err(anyhow::Error::from),
    };
    let container = opened.inspect_err(|e| {
        audit_cmd::record_failure(
            mount_event(args, Some(&prepared.choice)).field("stage", "open"),
            e,
        )
    })?;
    let container_id = container.info().id;
    let last_try = if args.allow_last_pin_try {
        LastTry::Allow
    } else {
        LastTry::Refuse
    };
    let unlocked =
        unlock::unlock_and_watch(&container, &prepared.choice, &password, &pin, last_try);
    drop((password, pin));
    // Unlocking left copies of the PIN, password hash and ECDH secret in dead stack frames.
    keybound::secrets::scrub_stack();
    let unlock_event = unlock_event(args, &prepared.choice, Some(&container_id));
    let (master_key, watch) = match unlocked {
        Ok(unlocked) => {
            audit_cmd::record(unlock_event.ok());
            unlocked
        }
        Err(e) => {
            let err = anyhow::Error::from(e);
            audit_cmd::record_failure(unlock_event.field("stage", "unlock"), &err);
            return Err(err);
        }
    };
    let options = daemon::ServeOptions {
        read_only: args.read_only,
        allow_other: args.allow_other,
        log: ready.and(registry::log_path(std::process::id()).ok()),
        idle: args.idle,
    };
    let vault = args.vault.display().to_string();
    let audit_event = |action: &str| {
        vault_event(action, args, Some(&prepared.choice), Some(&container_id))
            .field("mountpoint", prepared.mountpoint.display().to_string())
            .field("read_only", args.read_only)
    };
    let mounted = std::cell::Cell::new(false);
    let served = daemon::serve(
        container,
        master_key,
        &prepared.mountpoint,
        prepared.choice.slot.index,
        Some(daemon::Tether {
            serial: prepared.choice.serial,
            watch,
        }),
        &options,
        |record| {
            mounted.set(true);
            let event = audit_event("mount")
                .field("allow_other", args.allow_other)
                .field("idle_s", args.idle.map(|d| d.as_secs()));
            audit_cmd::record(event.ok());
            match ready {
                Some(pipe) => pipe.ready(),
                None => println!(
                    "Mounted {vault} at {} (token {}, key slot {}). Lock it with: keybound unmount {}",
                    record.mountpoint.display(),
                    prepared.choice.serial,
                    record.key_slot,
                    record.mountpoint.display()
                ),
            }
        },
    );
    let ended = match served {
        Ok(ended) => ended,
        Err(e) => {
            let err = anyhow::Error::from(e);
            // Failing after the mount was up means failing while locking.
            let action = if mounted.get() { "lock" } else { "mount" };
            audit_cmd::record_failure(audit_event(action), &err);
            return Err(err);
        }
    };
    let token = TokenName::serial(prepared.choice.serial);
    let action = match ended.reason {
        LockReason::Unmounted => "unmount",
        _ => "lock",
    };
    audit_cmd::record(
        audit_event(action)
            .reason(ended.reason.kind())
            .field("detail", ended.reason.describe(Some(&token)))
            .field(
                "took_ms",
                (ended.took.as_secs_f64() * 10_000.0).round() / 10.0,
            )
            .ok(),
    );
    // The store and its keys are gone; so must be their traces on this stack.
    keybound::secrets::scrub_stack();
    if args.diagnostic_linger {
        linger();
    }
    match ended.reason {
        LockReason::Unmounted => Ok(()),
        reason => Err(exitcodes::Coded {
            code: exitcodes::for_lock_reason(&reason),
            message: format!(
                "locked {vault}: {}; keys wiped",
                reason.describe(Some(&TokenName::serial(prepared.choice.serial)))
            ),
        }
        .into()),
    }
}

/// `--diagnostic-linger`: stay alive, keyless, until SIGKILL (every other
/// signal that ends us is blocked by now), so a test can read our memory.
fn linger() -> ! {
    tracing::warn!(
        "diagnostic: locked, lingering without keys until killed (pid {})",
        std::process::id()
    );
    loop {
        std::thread::park();
    }
}

/// Start `keybound mount -f` detached, secrets through pipes, and wait for it.
fn spawn_daemon(
    args: &MountArgs,
    prepared: &Prepared,
    password: SecretBytes,
    pin: Pin,
) -> Result<()> {
    let (password_rx, password_tx) = pipe()?;
    let (pin_rx, pin_tx) = pipe()?;
    let (ready_rx, ready_tx) = pipe()?;
    let exe = std::env::current_exe().context("cannot find the keybound executable")?;
    let log_dir = registry::log_path(0)
        .map(|p| p.with_file_name(""))
        .context("cannot create the log directory")?;
    let log_file = tempfile_in(&log_dir)?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(&args.vault)
        .arg(&prepared.mountpoint)
        .args(["--serial", &prepared.choice.serial.to_string()])
        .args(["--password-file", "/dev/fd/3", "--pin-file", "/dev/fd/4"])
        .args(["--ready-fd", "5"]);
    // The daemon records unlock, mount and lock in the same audit log.
    if let Ok(log) = keybound::audit::log_path() {
        cmd.arg("--audit-log").arg(log);
    }
    for (flag, on) in [
        ("--read-only", args.read_only),
        ("--allow-other", args.allow_other),
        ("--allow-last-pin-try", args.allow_last_pin_try),
        ("--diagnostic-linger", args.diagnostic_linger),
        // The daemon's log records each lock, its reason and how long it took.
        ("-v", true),
    ] {
        if on {
            cmd.arg(flag);
        }
    }
    if let Some(idle) = args.idle {
        cmd.args(["--idle", &format!("{}ms", idle.as_millis())]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file.1.try_clone()?);
    let fds = [
        password_rx.as_raw_fd(),
        pin_rx.as_raw_fd(),
        ready_tx.as_raw_fd(),
    ];
    // SAFETY: between fork and exec the closure only calls async-signal-safe
    // functions (setsid, dup2) on descriptors that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Move the pipes above the targets first: a pipe may already sit
            // on 3, 4 or 5, and dup2 onto itself would keep its close-on-exec.
            let mut high = [0; 3];
            for (slot, fd) in high.iter_mut().zip(fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount daemon")?;
    drop((password_rx, pin_rx, ready_tx));
    send_secret(password_tx, password.expose())?;
    send_secret(pin_tx, pin.expose())?;
    drop((password, pin));
    let log_path = rename_log(&log_file.0, child.id());
    match read_ready(ready_rx) {
        Ready::Ok => {
            println!(
                "Mounted {} at {} (token {}, key slot {}). Lock it with: keybound unmount {}",
                args.vault.display(),
                prepared.mountpoint.display(),
                prepared.choice.serial,
                prepared.choice.slot.index,
                prepared.mountpoint.display()
            );
            Ok(())
        }
        Ready::Failed { code, message } => {
            let _ = child.wait();
            Err(exitcodes::Coded { code, message }.into())
        }
        Ready::Silent => {
            let status = child.wait()?;
            let err = anyhow::anyhow!(
                "the mount daemon exited ({status}) without mounting; its log is {}",
                log_path.display()
            );
            audit_cmd::record_failure(mount_event(args, Some(&prepared.choice)), &err);
            Err(err)
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints. O_CLOEXEC keeps the
    // pipes out of any other child; the daemon gets copies through dup2.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a pipe");
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send_secret(fd: OwnedFd, secret: &[u8]) -> Result<()> {
    let mut file = std::fs::File::from(fd);
    file.write_all(secret)
        .and_then(|()| file.write_all(b"\n"))
        .context("cannot hand a secret to the mount daemon")
}

fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File)> {
    let path = dir.join(format!("mount-starting-{}.log", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create the daemon log {}", path.display()))?;
    Ok((path, file))
}

/// Name the daemon's log after its pid, as `status` shows it.
fn rename_log(path: &Path, pid: u32) -> PathBuf {
    let target = registry::log_path(pid).unwrap_or_else(|_| path.to_path_buf());
    match std::fs::rename(path, &target) {
        Ok(()) => target,
        Err(_) => path.to_path_buf(),
    }
}

enum Ready {
    Ok,
    Failed { code: i32, message: String },
    Silent,
}

/// The daemon writes `READY` or `ERROR <code>` and a message, then closes.
fn read_ready(fd: OwnedFd) -> Ready {
    let mut lines = BufReader::new(std::fs::File::from(fd)).lines();
    let Some(Ok(first)) = lines.next() else {
        return Ready::Silent;
    };
    if first == "READY" {
        return Ready::Ok;
    }
    let code = first
        .strip_prefix("ERROR ")
        .and_then(|c| c.parse().ok())
        .unwrap_or(exitcodes::OTHER);
    let message = lines.map_while(Result::ok).collect::<Vec<_>>().join("\n");
    Ready::Failed { code, message }
}

/// The daemon's end of the readiness pipe.
struct ReadyPipe {
    file: std::sync::Mutex<Option<std::fs::File>>,
}

impl ReadyPipe {
    fn from_fd(fd: i32) -> Self {
        // SAFETY: the parent passed this descriptor to us and nothing else owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        ReadyPipe {
            file: std::sync::Mutex::new(Some(file)),
        }
    }

    fn send(&self, text: &str) {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut file) = guard.take() {
            let _ = file.write_all(text.as_bytes());
        }
    }

    fn ready(&self) {
        self.send("READY\n");
    }

    fn failed(&self, err: &anyhow::Error) {
        self.send(&format!(
            "ERROR {}\n{}\n",
            exitcodes::for_error(err),
            super::error_text(err)
        ));
    }
}

pub fn unmount(args: UnmountArgs) -> Result<()> {
    let mut event = request_event("unmount-request", &args.dir, None);
    let result = unmount_inner(&args, &mut event);
    audit_cmd::record_result(event, &result);
    result
}

fn unmount_inner(args: &UnmountArgs, event: &mut Event) -> Result<()> {
    let path = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("{} does not exist", args.dir.display()))?;
    let record = registry::find_by_mountpoint(&path);
    *event = request_event("unmount-request", &path, record.as_ref());
    match mountpoint::mount_at(&path) {
        None if record.is_none() => bail!("{} is not a mounted keybound vault", path.display()),
        Some(m) if !daemon::is_keybound_entry(&m) => bail!(
            "{} is not a keybound vault: it is a {} mount of {}",
            path.display(),
            m.fstype,
            m.source
        ),
        _ => {}
    }
    if let Err(e) = daemon::unmount(&path, false) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(exitcodes::Coded {
                code: exitcodes::MOUNT_BUSY,
                message: format!(
                    "{} is busy: a program has a file or its working directory open there \
                     (`fuser -vm {}` lists them); close it and try again",
                    path.display(),
                    path.display()
                ),
            }
            .into());
        }
        return Err(e).with_context(|| format!("cannot unmount {}", path.display()));
    }
    if let Some(r) = &record {
        wait_for_exit(r.pid, Duration::from_secs(60))?;
    }
    match record {
        Some(r) => println!(
            "Locked {}: unmounted {}, keys wiped",
            r.container.display(),
            path.display()
        ),
        None => println!("Unmounted {}", path.display()),
    }
    Ok(())
}

/// The daemon commits and exits after the unmount; wait for that, so the
/// container is complete when `unmount` returns.
fn wait_for_exit(pid: u32, timeout: Duration) -> Result<()> {
    if !registry::wait_for_exit(pid, timeout) {
        bail!(
            "the mount daemon (process {pid}) has not exited {} s after the unmount; \
             check its log",
            timeout.as_secs()
        );
    }
    Ok(())
}

/// `keybound lock`: ask each daemon to run the lock procedure (open files get
/// errors, nothing stays cached) and wait until its keys are wiped.
pub fn lock(args: LockArgs) -> Result<()> {
    let records = match &args.dir {
        Some(dir) => vec![record_for_lock(dir).inspect_err(|e| {
            audit_cmd::record_failure(request_event("lock-request", dir, None), e)
        })?],
        None => registry::list(),
    };
    if records.is_empty() {
        println!("No vault is mounted.");
        return Ok(());
    }
    let mut failed = 0;
    for record in records {
        let locked = lock_one(&record);
        let event = request_event("lock-request", &record.mountpoint, Some(&record));
        audit_cmd::record_result(event.field("all", args.all), &locked);
        match locked {
            Ok(()) => println!(
                "Locked {}: unmounted {}, keys wiped",
                record.container.display(),
                record.mountpoint.display()
            ),
            Err(e) if args.all => {
                eprintln!("keybound: {}", super::error_text(&e));
                failed += 1;
            }
            Err(e) => return Err(e),
        }
    }
    if failed > 0 {
        bail!("{failed} vault(s) could not be locked");
    }
    Ok(())
}

/// An audit event for `keybound unmount` or `lock` on `mountpoint`: who asked
/// (the daemon records the lock itself, with its reason).
fn request_event(action: &str, mountpoint: &Path, record: Option<&registry::MountRecord>) -> Event {
    let event = match record {
        Some(r) => {
            let event = Event::new(action, &r.container)
                .slot(r.key_slot)
                .field("daemon_pid", r.pid);
            let event = match Container::inspect(&r.container) {
                Ok(header) => event.container_id(&header.id),
                Err(_) => event,
            };
            match r.token_serial {
                Some(serial) => event.token(serial),
                None => event,
            }
        }
        None => Event::without_vault(action),
    };
    event.field("mountpoint", mountpoint.display().to_string())
}

fn record_for_lock(dir: &Path) -> Result<registry::MountRecord> {
    let path =
        std::fs::canonicalize(dir).with_context(|| format!("{} does not exist", dir.display()))?;
    if let Some(record) = registry::find_by_mountpoint(&path) {
        return Ok(record);
    }
    match mountpoint::mount_at(&path) {
        Some(m) if daemon::is_keybound_entry(&m) => bail!(
            "{} is a keybound mount, but no running daemon of this user serves it \
             (it may belong to another user, or its daemon died: `umount -l {}` clears a dead one)",
            path.display(),
            path.display()
        ),
        _ => bail!("{} is not a mounted keybound vault", path.display()),
    }
}

fn lock_one(record: &registry::MountRecord) -> Result<()> {
    let pid = libc::pid_t::try_from(record.pid).context("bad process id in the mount record")?;
    // SAFETY: kill with a valid signal number; pid comes from a live record.
    if unsafe { libc::kill(pid, LOCK_SIGNAL) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(err).with_context(|| {
            format!(
                "cannot signal the mount daemon of {} (process {pid})",
                record.mountpoint.display()
            )
        });
    }
    wait_until_locked(record, Duration::from_secs(60))
}

/// Locked when the daemon has removed its record (after wiping its keys) or exited.
fn wait_until_locked(record: &registry::MountRecord, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while registry::process_alive(record.pid) && registry::find_by_pid(record.pid).is_some() {
        if start.elapsed() > timeout {
            bail!(
                "the mount daemon of {} (process {}) has not locked {} s after being asked; \
                 check its log{}",
                record.mountpoint.display(),
                record.pid,
                timeout.as_secs(),
                record
                    .log
                    .as_ref()
                    .map(|l| format!(" {}", l.display()))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
