//! External suites nobody here wrote, run on a real keybound mount: pjdfstest
//! (POSIX semantics, ~400 tests; it switches uids, so the vault is mounted with
//! --allow-other and the suite runs as root) and fsx (random
//! read/write/truncate/mmap checked against a reference copy).
//!
//! Both are installed from crates.io by scripts/setup.sh. The longer fsx run,
//! side by side with gocryptfs, is scripts/conformance.sh.

mod common;
#[path = "common/suites.rs"]
mod suites;

use common::vault::{Fixture, assert_ok};

/// pjdfstest failures we know and accept, each with the reason (docs/conformance.md).
const KNOWN_PJDFSTEST_FAILURES: &[&str] = &[];

#[test]
fn pjdfstest_passes_on_a_mounted_vault() {
    let fx = Fixture::new(30000001);
    assert_ok(&fx.create(&[]));
    assert_ok(&fx.mount(&["--allow-other"]));
    let work = fx.path("pjdfstest");
    std::fs::create_dir(&work).unwrap();
    let summary = suites::run_pjdfstest(&fx.mnt, &work);
    println!(
        "pjdfstest on keybound: {} passed, {} failed, {} skipped",
        summary.passed, summary.failed, summary.skipped
    );
    let unexpected: Vec<&String> = summary
        .failures
        .iter()
        .filter(|f| !KNOWN_PJDFSTEST_FAILURES.iter().any(|k| f.contains(k)))
        .collect();
    assert!(
        summary.passed >= 350,
        "only {} pjdfstest tests passed:\n{}",
        summary.passed,
        summary.raw_output
    );
    assert!(
        unexpected.is_empty(),
        "unexpected pjdfstest failures: {unexpected:#?}"
    );
    assert_ok(&fx.unmount());
}

#[test]
fn fsx_20000_operations_match_the_reference() {
    let fx = Fixture::create_and_mount(30000002, &[]);
    let outcome = suites::run_fsx(&fx.mnt.join("fsx.data"), 20_000, 20261123);
    assert!(
        outcome.ok && outcome.ops_done >= 20_000,
        "fsx failed after {} operations:\n{}",
        outcome.ops_done,
        outcome.output
    );
    // The data fsx left behind survives a remount.
    let before = std::fs::read(fx.mnt.join("fsx.data")).unwrap();
    assert_ok(&fx.unmount());
    assert_ok(&fx.mount(&[]));
    assert_eq!(std::fs::read(fx.mnt.join("fsx.data")).unwrap(), before);
    assert_ok(&fx.unmount());
}
