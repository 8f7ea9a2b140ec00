//! The audit log, end to end: real pcscd, software card and FUSE, driven
//! through the `keybound` CLI. Create, failed unlocks (wrong password, wrong
//! PIN), a mount, `keybound lock` and a pulled token are each one chained
//! JSON line naming the slot and token and never a secret; `keybound audit
//! verify` accepts the log and, after one line is edited, names that line
//! and exits with the documented code.

mod common;

use std::path::Path;
use std::time::Duration;

use common::vault::{
    Fixture, PASSWORD, PIN, assert_fails, assert_ok, stderr, stdout, wait_for_exit,
};
use common::wait_until;

/// From docs/user-guide.md's exit-code table.
const EXISTS: i32 = 25;
const WRONG_PASSWORD: i32 = 20;
const WRONG_PIN: i32 = 13;
const AUDIT_TAMPERED: i32 = 40;

const SERIAL: u32 = 50_000_001;
const WRONG_PASSWORD_TEXT: &str = "not the vault password";
const WRONG_PIN_TEXT: &str = "97531864";

fn entries(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The entries with this action and outcome.
fn find(log: &Path, action: &str, outcome: &str) -> Vec<serde_json::Value> {
    entries(log)
        .into_iter()
        .filter(|e| e["action"] == action && e["outcome"] == outcome)
        .collect()
}

#[test]
fn every_step_is_logged_chained_and_secret_free_and_an_edit_is_caught() {
    let mut fx = Fixture::new(SERIAL);
    // A directory that does not exist yet: the log creates it.
    let log = fx.path("state/audit.log");
    let log_arg = log.to_str().unwrap().to_string();
    let with_log = ["--audit-log", log_arg.as_str()];

    assert_ok(&fx.create(&with_log));
    let created = find(&log, "create", "ok");
    assert_eq!(created.len(), 1, "{:?}", entries(&log));
    let container_id = created[0]["vault"]["container_id"]
        .as_str()
        .expect("the container id of the new vault")
        .to_string();
    assert_eq!(container_id.len(), 32);
    assert_eq!(
        created[0]["vault"]["path"],
        std::fs::canonicalize(&fx.vault)
            .unwrap()
            .display()
            .to_string()
    );
    assert_eq!(created[0]["token_serial"], SERIAL);
    assert_eq!(created[0]["slot"], 0);
    assert!(find(&log, "create", "failed").is_empty());

    // A refusal is logged too.
    assert_fails(&fx.create(&with_log), EXISTS, &["exists already"]);
    let refused = find(&log, "create", "failed");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["error"]["kind"], "exists");

    // Wrong password: the daemon records the failed unlock, with slot and token.
    let wrong_password = fx.secret("wrong-password", WRONG_PASSWORD_TEXT);
    assert_fails(
        &fx.mount_with(&wrong_password, &fx.pin, &with_log),
        WRONG_PASSWORD,
        &["wrong password"],
    );
    // Wrong PIN: the tries left are part of the entry.
    let wrong_pin = fx.secret("wrong-pin", WRONG_PIN_TEXT);
    assert_fails(
        &fx.mount_with(&fx.password, &wrong_pin, &with_log),
        WRONG_PIN,
        &["wrong PIN"],
    );
    let failed = find(&log, "unlock", "failed");
    assert_eq!(failed.len(), 2, "{failed:?}");
    for entry in &failed {
        assert_eq!(entry["slot"], 0, "{entry}");
        assert_eq!(entry["token_serial"], SERIAL, "{entry}");
        assert_eq!(entry["vault"]["container_id"], container_id.as_str());
        assert_eq!(entry["extra"]["stage"], "unlock");
    }
    assert_eq!(failed[0]["error"]["kind"], "wrong-password");
    assert_eq!(failed[1]["error"]["kind"], "wrong-pin");
    assert_eq!(failed[1]["extra"]["pin_tries_left"], 2);
    assert!(
        failed[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 tries left"),
        "{}",
        failed[1]
    );

    // A good mount: unlock and mount are logged by the daemon before `mount` returns.
    assert_ok(&fx.mount(&with_log));
    assert_eq!(find(&log, "unlock", "ok").len(), 1);
    let mounted = find(&log, "mount", "ok");
    assert_eq!(mounted.len(), 1);
    assert_eq!(
        mounted[0]["extra"]["mountpoint"],
        std::fs::canonicalize(&fx.mnt)
            .unwrap()
            .display()
            .to_string()
    );
    let daemon = fx.daemon_pid();
    assert_eq!(mounted[0]["pid"], daemon);

    // `keybound lock` (the log through the environment this time): the
    // command records the request, the daemon the lock and its reason.
    let out = fx
        .command(&["lock", fx.mnt.to_str().unwrap()])
        .env("KEYBOUND_AUDIT_LOG", &log)
        .output()
        .unwrap();
    assert_ok(&out);
    wait_for_exit(daemon, Duration::from_secs(30));
    let requested = find(&log, "lock-request", "ok");
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0]["extra"]["daemon_pid"], daemon);
    let locked = find(&log, "lock", "ok");
    assert_eq!(locked.len(), 1, "{:?}", entries(&log));
    assert_eq!(locked[0]["reason"], "lock-command");
    assert_eq!(locked[0]["pid"], daemon);
    assert_eq!(locked[0]["token_serial"], SERIAL);
    assert!(locked[0]["extra"]["took_ms"].as_f64().unwrap() >= 0.0);

    // The token leaves: the daemon logs why it locked.
    assert_ok(&fx.mount(&with_log));
    let daemon = fx.daemon_pid();
    fx.card().pull();
    wait_for_exit(daemon, Duration::from_secs(30));
    wait_until("the lock entry", Duration::from_secs(10), || {
        find(&log, "lock", "ok").len() == 2
    });
    assert_eq!(find(&log, "lock", "ok")[1]["reason"], "token-removed");

    // Every entry: who, where, when; numbered from 1; no secret anywhere.
    let all = entries(&log);
    for (i, entry) in all.iter().enumerate() {
        assert_eq!(entry["seq"], i as u64 + 1);
        assert!(entry["user"]["uid"].is_u64(), "{entry}");
        assert!(entry["host"].is_string(), "{entry}");
        assert!(entry["pid"].is_u64(), "{entry}");
        assert!(entry["time"].as_str().unwrap().ends_with('Z'), "{entry}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [PASSWORD, PIN, WRONG_PASSWORD_TEXT, WRONG_PIN_TEXT] {
        assert!(
            !text.contains(secret),
            "the log contains a secret: {secret}"
        );
    }

    // The chain is intact.
    let out = fx.run(&["audit", "verify", "--audit-log", &log_arg]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!("{} entries, chain intact", all.len())),
        "{}",
        stdout(&out)
    );
    let out = fx.run(&["audit", "show", "--last", "2", "--audit-log", &log_arg]);
    assert_ok(&out);
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    assert!(stdout(&out).contains("lock ok"), "{}", stdout(&out));

    // Someone turns the wrong-password failure (line 3) into a success.
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(lines[2].contains("\"wrong-password\""), "{}", lines[2]);
    lines[2] = lines[2].replace("\"outcome\":\"failed\"", "\"outcome\":\"ok\"");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = fx
        .command(&["audit", "verify"])
        .env("KEYBOUND_AUDIT_LOG", &log)
        .output()
        .unwrap();
    assert_fails(
        &out,
        AUDIT_TAMPERED,
        &["line 3", "changed after it was written"],
    );
    assert!(!stdout(&out).contains("chain intact"), "{}", stderr(&out));
}
