//! A vault on a software card, driven through the `keybound` CLI as a user
//! would: set up the card, create the vault, mount it, unmount it. Every test
//! gets its own temp dir and runtime dir (status records), so tests in
//! parallel do not see each other's mounts.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{KEYBOUND_BIN, ReadersLock, SoftCard, wait_until};

pub const PASSWORD: &str = "correct horse battery";
pub const PIN: &str = "24681357";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub vault: PathBuf,
    pub mnt: PathBuf,
    pub password: PathBuf,
    pub pin: PathBuf,
    pub serial: u32,
    card: Option<SoftCard>,
    lock: Option<ReadersLock>,
}

impl Fixture {
    /// A provisioned software card with `serial` in reader 0, an empty mount
    /// directory and the secrets in files. Holds the readers lock until
    /// [`Fixture::release_token`] or drop.
    pub fn new(serial: u32) -> Self {
        let lock = ReadersLock::acquire();
        let dir = tempfile::tempdir().unwrap();
        let card = SoftCard::insert(&dir.path().join("card.json"), serial, 0);
        let fixture = Fixture {
            vault: dir.path().join("vault.kb"),
            mnt: dir.path().join("mnt"),
            password: secret_file(dir.path(), "password", PASSWORD),
            pin: secret_file(dir.path(), "pin", PIN),
            serial,
            card: Some(card),
            lock: Some(lock),
            dir,
        };
        std::fs::create_dir(&fixture.mnt).unwrap();
        let out = fixture.run(&[
            "token",
            "setup",
            "--serial",
            &serial.to_string(),
            "--new-pin-file",
            fixture.pin.to_str().unwrap(),
        ]);
        assert_ok(&out);
        fixture
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn secret(&self, name: &str, value: &str) -> PathBuf {
        secret_file(self.dir.path(), name, value)
    }

    /// `keybound ARGS` with this fixture's runtime dir.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run keybound")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(KEYBOUND_BIN);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env("KEYBOUND_RUNTIME_DIR", self.dir.path().join("run"))
            // Tests run as root: keep their entries out of /var/log/keybound.
            .env("KEYBOUND_AUDIT_LOG", self.dir.path().join("audit.log"))
            .stdin(Stdio::null());
        cmd
    }

    /// `keybound COMMAND VAULT` with the fixture's password and PIN files, then `extra`.
    pub fn run_with_secrets(&self, command: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            command,
            self.vault.to_str().unwrap(),
            "--password-file",
            self.password.to_str().unwrap(),
            "--pin-file",
            self.pin.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `keybound create` with the fixture's secrets and the default KDF (RFC
    /// 9106's recommendation, as users get it).
    pub fn create(&self, extra: &[&str]) -> Output {
        self.run_with_secrets("create", extra)
    }

    /// `keybound mount VAULT MNT` with the fixture's secrets (detached).
    pub fn mount(&self, extra: &[&str]) -> Output {
        self.mount_with(&self.password, &self.pin, extra)
    }

    pub fn mount_with(&self, password: &Path, pin: &Path, extra: &[&str]) -> Output {
        self.mount_command(password, pin, extra)
            .output()
            .expect("run keybound mount")
    }

    /// `keybound mount VAULT MNT --password-file … --pin-file … EXTRA`, not run yet.
    pub fn mount_command(&self, password: &Path, pin: &Path, extra: &[&str]) -> Command {
        let mut args = vec![
            "mount",
            self.vault.to_str().unwrap(),
            self.mnt.to_str().unwrap(),
            "--password-file",
            password.to_str().unwrap(),
            "--pin-file",
            pin.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.command(&args)
    }

    /// `keybound mount -f` as a child of the test, so its exit status (why the
    /// vault locked) can be read; returns once the mount is up.
    pub fn mount_foreground(&self, extra: &[&str]) -> Child {
        let mut args = vec!["-f"];
        args.extend_from_slice(extra);
        let mut child = self
            .mount_command(&self.password, &self.pin, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keybound mount -f");
        wait_until("the foreground mount", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("keybound mount -f exited ({status}) before mounting:\n{err}");
            }
            self.is_mounted() && !self.status_is_empty()
        });
        child
    }

    fn status_is_empty(&self) -> bool {
        let out = self.run(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v.as_array().is_none_or(|a| a.is_empty()))
            .unwrap_or(true)
    }

    pub fn unmount(&self) -> Output {
        self.run(&["unmount", self.mnt.to_str().unwrap()])
    }

    /// Create and mount, asserting both work.
    pub fn create_and_mount(serial: u32, create_extra: &[&str]) -> Self {
        let fixture = Fixture::new(serial);
        assert_ok(&fixture.create(create_extra));
        assert_ok(&fixture.mount(&[]));
        fixture
    }

    /// The mount daemon's pid, from `keybound status --json`.
    pub fn daemon_pid(&self) -> u32 {
        let out = self.run(&["status", "--json"]);
        assert_ok(&out);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .and_then(|a| a.first())
            .and_then(|m| m["pid"].as_u64())
            .unwrap_or_else(|| panic!("no mount in status: {list}")) as u32
    }

    pub fn is_mounted(&self) -> bool {
        let mnt = std::fs::canonicalize(&self.mnt).unwrap_or(self.mnt.clone());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
    }

    pub fn card(&mut self) -> &mut SoftCard {
        self.card.as_mut().expect("the card was released")
    }

    /// `keybound verify --deep CONTAINER EXTRA` with the fixture's secrets.
    pub fn verify_deep(&self, container: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "verify",
            "--deep",
            s(container),
            "--password-file",
            s(&self.password),
            "--pin-file",
            s(&self.pin),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `keybound info --json CONTAINER`, parsed.
    pub fn info_json(&self, container: &Path) -> serde_json::Value {
        let out = self.run(&["info", s(container), "--json"]);
        assert_ok(&out);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)))
    }

    /// How many sectors CONTAINER leaves unsealed (free space that is zeros
    /// in the file, FORMAT.md §4.2), from `info --json`.
    pub fn unsealed_sectors(&self, container: &Path) -> u64 {
        self.info_json(container)["unsealed_sectors"]
            .as_u64()
            .expect("info --json has unsealed_sectors")
    }

    /// SHA-256 of the container file, to prove a refusal changed nothing.
    pub fn vault_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(&self.vault).unwrap()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = self.unmount();
        }
        if self.is_mounted() {
            // A failed test may leave a busy or dead mount: detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

pub fn secret_file(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "keybound failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

#[track_caller]
pub fn assert_fails(out: &Output, code: i32, message_parts: &[&str]) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr: {err}\nstdout: {}",
        stdout(out)
    );
    for part in message_parts {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.matches("(os error").count() <= 1,
        "a reason said twice: {err}"
    );
}

/// Wait until `pid` has exited (it is not our child, so poll).
pub fn wait_for_exit(pid: u32, timeout: Duration) {
    wait_until(&format!("process {pid} to exit"), timeout, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
    });
}

/// `path` as `&str`, for argument lists.
/// Flip one bit of the file at `offset`.
pub fn flip_bit(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Deterministic, incompressible-looking bytes for file `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Path (relative) → SHA-256 of every regular file under `root`.
pub fn tree_digests(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let mut hasher = Sha256::new();
                let mut file = std::fs::File::open(&path).unwrap();
                std::io::copy(&mut file, &mut hasher).unwrap();
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, hex::encode(hasher.finalize()));
            }
        }
    }
    out
}

/// A second software card (`serial`) in reader 1, provisioned with `pin`.
pub fn second_card(fx: &Fixture, serial: u32, pin: &str) -> SoftCard {
    let card = SoftCard::insert(&fx.path("card2.json"), serial, 1);
    let pin = fx.secret("pin2", pin);
    assert_ok(&fx.run(&[
        "token",
        "setup",
        "--serial",
        &serial.to_string(),
        "--new-pin-file",
        s(&pin),
    ]));
    card
}
