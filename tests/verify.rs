//! `keybound verify` end to end: real pcscd and software card, real containers made and
//! damaged the way a disk or a copy tool would, the `keybound` CLI. A good vault and a copy of a
//! mounted one pass and are not written to; a flipped bit names the file it hit; a truncated
//! copy, a damaged header copy and an interrupted incremental backup are reported.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;

use common::vault::{Fixture, assert_fails, assert_ok, content, flip_bit, s, stdout};

/// Exit codes from docs/user-guide.md.
const USAGE: i32 = 2;
const VAULT_IN_USE: i32 = 22;
const NEEDS_RECOVERY: i32 = 27;
const VERIFY_DAMAGE: i32 = 51;

const DATA_OFFSET: u64 = 65536;

fn verify(fx: &Fixture, vault: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["verify", s(vault)];
    args.extend_from_slice(extra);
    fx.run(&args)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

fn digest(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// A small tree with every kind of record the check reads.
fn populate(mnt: &Path) {
    fs::create_dir_all(mnt.join("docs/deeper")).unwrap();
    fs::write(mnt.join("docs/report.txt"), content(1, 200_000)).unwrap();
    fs::write(mnt.join("docs/deeper/empty"), b"").unwrap();
    fs::write(mnt.join("small"), b"small and intact").unwrap();
    fs::hard_link(mnt.join("small"), mnt.join("docs/small-link")).unwrap();
    std::os::unix::fs::symlink("docs/report.txt", mnt.join("link")).unwrap();
    set_xattr(&mnt.join("small"), "user.note", b"an attribute");
    let sparse = fs::File::create(mnt.join("sparse")).unwrap();
    sparse.set_len(10 << 20).unwrap();
    sparse.write_all_at(b"in the middle", 5 << 20).unwrap();
}

#[test]
fn a_good_vault_passes_both_levels_and_is_not_written() {
    let fx = Fixture::create_and_mount(60_000_701, &[]);
    populate(&fx.mnt);

    // Mounted: the keyless check works, the deep one is refused, naming the mount.
    assert_ok(&verify(&fx, &fx.vault, &[]));
    let out = fx.verify_deep(&fx.vault, &[]);
    assert_fails(
        &out,
        VAULT_IN_USE,
        &[
            "mounted at",
            s(&fx.mnt),
            "keybound backup",
            "keybound unmount",
        ],
    );
    assert_ok(&fx.unmount());

    let before = fx.vault_digest();
    let out = verify(&fx, &fx.vault, &[]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("header copy A"), "{text}");
    assert!(text.contains("no damage found"), "{text}");

    let out = fx.verify_deep(&fx.vault, &[]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("every sector authenticates"), "{text}");
    assert!(text.contains("consistent"), "{text}");

    let out = fx.verify_deep(&fx.vault, &["--json"]);
    assert_ok(&out);
    let report = json(&out);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["damaged_files"], serde_json::json!([]));
    let fsck = &report["deep"]["filesystem"];
    assert_eq!(fsck["directories"], 3, "{fsck:#}");
    assert_eq!(fsck["files"], 4, "{fsck:#}");
    assert_eq!(fsck["symlinks"], 1, "{fsck:#}");
    assert_eq!(fsck["xattrs"], 1, "{fsck:#}");
    assert_eq!(fsck["inconsistencies"], serde_json::json!([]));
    assert!(report["deep"]["sectors_checked"].as_u64().unwrap() > 0);

    assert_eq!(fx.vault_digest(), before, "verify changed the container");

    // The key flags belong to --deep.
    assert_fails(
        &fx.run(&["verify", s(&fx.vault), "--pin-file", s(&fx.pin)]),
        USAGE,
        &["--deep"],
    );
    // The deep check is in the audit log, with no path from inside the vault.
    let log = fs::read_to_string(fx.path("audit.log")).unwrap();
    let verify_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"action\":\"verify\""))
        .collect();
    // The refusal while mounted, then the two checks.
    assert_eq!(verify_lines.len(), 3, "{log}");
    assert!(verify_lines[0].contains("vault-in-use"), "{log}");
    assert!(
        verify_lines.iter().all(|l| !l.contains("report.txt")),
        "{log}"
    );
}

/// A copy taken with `cp` while the vault is mounted is in the state of a crash (redb's last
/// commit is not marked clean): a read-only mount refuses it, but `verify --deep` replays the
/// commit in memory, passes, and leaves the copy byte for byte as it was.
#[test]
fn a_copy_of_a_mounted_vault_passes_deep_and_is_not_written() {
    let fx = Fixture::create_and_mount(60_000_702, &[]);
    populate(&fx.mnt);
    let mut f = fs::File::create(fx.mnt.join("fsynced")).unwrap();
    f.write_all(&content(2, 1 << 20)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let copy = fx.path("copy.kb");
    fs::copy(&fx.vault, &copy).unwrap();
    assert_ok(&fx.unmount());

    let before = digest(&copy);
    let out = fx.verify_deep(&copy, &["--json"]);
    assert_ok(&out);
    let report = json(&out);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["deep"]["filesystem"]["files"], 5, "{report:#}");
    assert_eq!(digest(&copy), before, "verify changed the copy");

    // It really is the crash state: a read-only mount of the copy must refuse it.
    let mnt2 = fx.path("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let out = fx.run(&[
        "mount",
        s(&copy),
        s(&mnt2),
        "--read-only",
        "--password-file",
        s(&fx.password),
        "--pin-file",
        s(&fx.pin),
    ]);
    assert_fails(&out, NEEDS_RECOVERY, &["not closed cleanly"]);
    assert_eq!(digest(&copy), before);
}

#[test]
fn a_flipped_bit_names_the_damaged_file_and_only_it() {
    let fx = Fixture::create_and_mount(60_000_703, &[]);
    populate(&fx.mnt);
    fs::write(fx.mnt.join("big"), content(7, 24 << 20)).unwrap();
    assert_ok(&fx.unmount());

    // The big file is almost all of the data area: hit the middle of it.
    let len = fs::metadata(&fx.vault).unwrap().len();
    let target = DATA_OFFSET + (len - DATA_OFFSET) / 2;
    flip_bit(&fx.vault, target);
    let sector = (target - DATA_OFFSET) / 4124;

    // Without keys nothing shows: sectors are only checked with the key.
    assert_ok(&verify(&fx, &fx.vault, &[]));

    let before = fx.vault_digest();
    let out = fx.verify_deep(&fx.vault, &["--json"]);
    assert_fails(&out, VERIFY_DAMAGE, &["damaged"]);
    let report = json(&out);
    assert_eq!(report["ok"], false);
    assert_eq!(
        report["damaged_files"],
        serde_json::json!(["/big"]),
        "{report:#}"
    );
    let sectors = report["deep"]["damaged_sectors"].as_array().unwrap();
    assert_eq!(sectors.len(), 1, "{report:#}");
    assert_eq!(sectors[0]["sector"], sector);
    assert_eq!(sectors[0]["used_by"], serde_json::json!(["/big"]));
    let damaged = report["deep"]["filesystem"]["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1);
    assert!(
        damaged[0]["unreadable"][0]
            .as_str()
            .unwrap()
            .starts_with("data at bytes "),
        "{report:#}"
    );
    assert_eq!(
        report["deep"]["filesystem"]["inconsistencies"],
        serde_json::json!([])
    );

    // The human report names it, says the rest is fine and what to do.
    let out = fx.verify_deep(&fx.vault, &[]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let text = stdout(&out);
    assert!(
        text.contains("damaged: /big (file): data at bytes"),
        "{text}"
    );
    assert!(text.contains(&format!("sector {sector} ")), "{text}");
    assert!(text.contains("used by /big"), "{text}");
    assert!(text.contains("everything else reads fine"), "{text}");
    assert!(!text.contains("damaged: /small"), "{text}");
    assert_eq!(fx.vault_digest(), before, "verify changed the container");

    // And the mount agrees: the other files read.
    assert_ok(&fx.mount(&[]));
    assert_eq!(fs::read(fx.mnt.join("small")).unwrap(), b"small and intact");
    assert_eq!(
        fs::read(fx.mnt.join("docs/report.txt")).unwrap(),
        content(1, 200_000)
    );
    assert!(fs::read(fx.mnt.join("big")).is_err());
    assert_ok(&fx.unmount());
}

#[test]
fn truncated_damaged_header_and_incomplete_copies_are_reported() {
    let fx = Fixture::create_and_mount(60_000_704, &[]);
    fs::write(fx.mnt.join("data"), content(9, 3 << 20)).unwrap();
    assert_ok(&fx.unmount());
    let len = fs::metadata(&fx.vault).unwrap().len();

    // A copy cut short by 10,000 bytes: reported without any key, and --deep does not ask.
    let cut = fx.path("cut.kb");
    fs::copy(&fx.vault, &cut).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len - 10_000)
        .unwrap();
    let out = verify(&fx, &cut, &[]);
    assert_fails(&out, VERIFY_DAMAGE, &["cut.kb"]);
    let text = stdout(&out);
    assert!(text.contains("truncated"), "{text}");
    assert!(text.contains("10000 bytes are missing"), "{text}");
    assert!(text.contains("restore"), "{text}");
    let out = fx.run(&["verify", "--deep", s(&cut), "--json"]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let report = json(&out);
    assert!(report["deep_skipped"].is_string(), "{report:#}");
    let kinds: Vec<&str> = report["shallow"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["truncated"]);

    // Header copy A damaged (its generation field): B is used, the vault still opens deep.
    let torn = fx.path("torn.kb");
    fs::copy(&fx.vault, &torn).unwrap();
    flip_bit(&torn, 20);
    let out = verify(&fx, &torn, &[]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let text = stdout(&out);
    assert!(text.contains("checksum mismatch"), "{text}");
    assert!(text.contains("header copy B"), "{text}");
    assert!(text.contains("copy B (generation"), "{text}");
    assert!(text.contains("keybound header restore"), "{text}");
    let out = fx.verify_deep(&torn, &["--json"]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let report = json(&out);
    assert_eq!(report["shallow"]["copy_used"], "B");
    assert_eq!(report["shallow"]["copies"][0]["status"], "damaged");
    assert_eq!(report["deep"]["header_macs"][1], "valid");
    assert_eq!(report["deep"]["damaged_sectors"], serde_json::json!([]));
    assert_eq!(report["damaged_files"], serde_json::json!([]));

    // An incremental backup interrupted: its marker beside the copy.
    let partial = fx.path("partial.kb");
    fs::copy(&fx.vault, &partial).unwrap();
    fs::write(fx.path("partial.kb.partial"), b"").unwrap();
    let out = verify(&fx, &partial, &[]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let text = stdout(&out);
    assert!(text.contains("incomplete"), "{text}");
    assert!(text.contains("rerun the backup"), "{text}");

    // The store's own header page (both copies of its shadow pair, sectors 0 and 1): the
    // filesystem cannot be opened, and the report says why and where.
    let headless = fx.path("headless.kb");
    fs::copy(&fx.vault, &headless).unwrap();
    flip_bit(&headless, DATA_OFFSET + 100);
    flip_bit(&headless, DATA_OFFSET + 4124 + 100);
    let out = fx.verify_deep(&headless, &["--json"]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let report = json(&out);
    assert!(
        report["deep"]["filesystem_error"]
            .as_str()
            .unwrap()
            .contains("cannot be opened"),
        "{report:#}"
    );
    let sectors = report["deep"]["damaged_sectors"].as_array().unwrap();
    assert_eq!(sectors.len(), 2, "{report:#}");
    assert!(
        sectors[0]["used_by"][0]
            .as_str()
            .unwrap()
            .starts_with("filesystem metadata"),
        "{report:#}"
    );
    let out = fx.verify_deep(&headless, &[]);
    assert_fails(&out, VERIFY_DAMAGE, &[]);
    let text = stdout(&out);
    assert!(text.contains("restore"), "{text}");

    // The original is fine throughout.
    assert_ok(&verify(&fx, &fx.vault, &[]));
}
