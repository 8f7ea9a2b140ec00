//! `keybound verify` without keys: what the header copies, the geometry and
//! the file's length say about a container or a copy of one (FORMAT.md §1.1,
//! §4.1). Nothing here needs a key or takes the file lock; nothing is
//! written. The deep check (every sector, the filesystem) is the session
//! layer's (`crate::session::verify`); the container's part of it is
//! [`Container::header_macs`] and [`super::SectorStore::scan_sectors`].

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{ContainerError, io_err};
use super::header::{CopyProblem, Header, verify_mac};
use super::layout::*;
use super::{Container, HeaderCopies, HeaderCopy, RekeyInfo, header_info, mac_for, read_copies};
use crate::crypto::MasterKey;

/// How serious a finding is: damage makes `verify` fail; a note does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Damage,
    Note,
}

/// One thing `verify` found, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// A stable name for scripts (`header-copy-damaged`, `truncated`, …).
    pub kind: &'static str,
    pub message: String,
    /// What to do about it, if anything.
    pub advice: Option<String>,
}

impl Finding {
    pub fn damage(kind: &'static str, message: String, advice: Option<String>) -> Self {
        Finding {
            severity: Severity::Damage,
            kind,
            message,
            advice,
        }
    }

    pub fn note(kind: &'static str, message: String, advice: Option<String>) -> Self {
        Finding {
            severity: Severity::Note,
            kind,
            message,
            advice,
        }
    }
}

/// What was found at one header copy's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyStatus {
    /// Checksum and every field in range.
    Valid,
    /// No keybound magic at all (zeroed or overwritten).
    NoMagic,
    /// A keybound header of another format version.
    OtherVersion,
    /// Cut short, a checksum mismatch, or a field out of range.
    Damaged,
}

/// One header copy, as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub copy: HeaderCopy,
    /// Byte offset of the copy in the file.
    pub offset: u64,
    pub status: CopyStatus,
    /// The copy's generation, if it is valid.
    pub generation: Option<u64>,
    /// Why it is not valid.
    pub problem: Option<String>,
}

/// The data area's shape, from the header in use and the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Plaintext bytes per sector (4096).
    pub sector_size: u64,
    /// Bytes per sealed sector in the file (4124).
    pub sealed_sector_size: u64,
    /// Where sealed sector 0 starts (65536).
    pub data_offset: u64,
    /// redb's logical length.
    pub store_len: u64,
    /// Sectors sealed at least once.
    pub extent_sectors: u64,
    /// Sectors of a fixed-size container; `None` if it grows.
    pub capacity_sectors: Option<u64>,
    /// The file length the header promises: `data_offset + max(extent,
    /// capacity) × sealed_sector_size`.
    pub expected_len: u64,
    /// The file's actual length.
    pub file_len: u64,
}

/// What `keybound verify VAULT` finds without a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShallowReport {
    pub path: PathBuf,
    pub file_len: u64,
    pub copies: [CopyReport; 2],
    /// The copy a mount would use (the valid one with the higher generation).
    pub copy_used: Option<HeaderCopy>,
    /// The container id of the copy in use, hex.
    pub container_id: Option<String>,
    /// When both copies are valid: the header fields in which they differ
    /// (normal: the older copy is one header write behind).
    pub copies_differ_in: Vec<&'static str>,
    pub geometry: Option<Geometry>,
    pub rekey_in_progress: Option<RekeyInfo>,
    pub pending_slots: Vec<u8>,
    /// The marker an interrupted incremental backup leaves beside its copy.
    pub partial_marker: Option<PathBuf>,
    pub findings: Vec<Finding>,
}

impl ShallowReport {
    /// Whether anything found is damage (`verify` then exits 51).
    pub fn damaged(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Damage)
    }

    /// Whether the copy can be unlocked for a deep check: a header to use
    /// and the whole data area present.
    pub fn unlockable(&self) -> bool {
        self.copy_used.is_some() && self.geometry.is_some_and(|g| g.file_len >= g.expected_len)
    }
}

/// The marker beside a copy that an incremental backup is updating in
/// place: while it exists the copy is incomplete. (The backup writes it
/// before it changes the copy and removes it when the copy is whole.)
pub fn partial_marker(copy: &Path) -> PathBuf {
    let mut name = copy.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn copy_name(copy: usize) -> HeaderCopy {
    if copy == 0 {
        HeaderCopy::A
    } else {
        HeaderCopy::B
    }
}

fn letter(copy: usize) -> &'static str {
    if copy == 0 { "A" } else { "B" }
}

/// Check `path` without a key: both header copies, which one is used and
/// whether they agree, the geometry against the file's length, an
/// unfinished key rotation, and an interrupted incremental backup.
///
/// Not being a keybound container at all, or one of a newer format, is an
/// error (there is nothing to verify); everything else is reported.
pub fn verify_container(path: &Path) -> Result<ShallowReport, ContainerError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let HeaderCopies {
        file_len,
        copies,
        chosen,
    } = read_copies(path, &file)?;
    drop(file);
    let mut findings = Vec::new();

    let reports = [0, 1].map(|i| copy_report(i, &copies.parsed[i]));
    let (used, other_valid) = match chosen {
        Some((used, other_valid)) => (Some(used), other_valid),
        None => (None, false),
    };

    let mut report = ShallowReport {
        path: path.to_path_buf(),
        file_len,
        copies: reports,
        copy_used: used.map(copy_name),
        container_id: None,
        copies_differ_in: Vec::new(),
        geometry: None,
        rekey_in_progress: None,
        pending_slots: Vec::new(),
        partial_marker: None,
        findings: Vec::new(),
    };

    match used {
        None => findings.push(Finding::damage(
            "both-header-copies-damaged",
            format!(
                "both header copies are damaged (A: {}; B: {}), so the key slots cannot be read",
                problem_text(&report.copies[0]),
                problem_text(&report.copies[1])
            ),
            Some(
                "restore the whole container from a backup, or its header with `keybound header \
                 restore VAULT BACKUP` if you kept a header backup"
                    .into(),
            ),
        )),
        Some(used) => {
            let Ok((header, _)) = &copies.parsed[used] else {
                // `choose` only picks a valid copy.
                return Err(ContainerError::BothHeadersDamaged {
                    path: path.to_path_buf(),
                });
            };
            let other = 1 - used;
            if !other_valid {
                findings.push(Finding::damage(
                    "header-copy-damaged",
                    format!(
                        "header copy {} is {} ({}); copy {} (generation {}) is intact and is used",
                        letter(other),
                        status_text(report.copies[other].status),
                        problem_text(&report.copies[other]),
                        letter(used),
                        header.generation
                    ),
                    Some(format!(
                        "the vault still opens. A read-write mount rewrites copy {} from copy {}; \
                         or restore the header with `keybound header restore {} BACKUP` from a \
                         header backup. If this is a backup copy, take a fresh one",
                        letter(other),
                        letter(used),
                        path.display()
                    )),
                ));
            } else if let Ok((h_other, _)) = &copies.parsed[other] {
                compare_copies(&mut report, &mut findings, header, h_other, used);
            }
            let info = header_info(header, used, other_valid, file_len);
            report.container_id = Some(hex::encode(header.id));
            report.rekey_in_progress = info.rekey_in_progress;
            report.pending_slots = info.pending_slots.clone();
            report.geometry = Some(geometry(header, file_len));
            check_geometry(path, header, file_len, &mut findings);
            notes_on_state(path, header, &info, &mut findings);
        }
    }

    let marker = partial_marker(path);
    if marker.exists() {
        findings.push(Finding::damage(
            "incomplete-copy",
            format!(
                "this copy is incomplete: {} exists, so an incremental backup was interrupted \
                 while it updated the copy in place",
                marker.display()
            ),
            Some(
                "rerun the backup (`keybound backup VAULT COPY --incremental` finishes it); do \
                 not restore from this copy"
                    .into(),
            ),
        ));
        report.partial_marker = Some(marker);
    }
    report.findings = findings;
    Ok(report)
}

fn copy_report(copy: usize, parsed: &Result<(Header, Vec<u8>), CopyProblem>) -> CopyReport {
    let (status, generation, problem) = match parsed {
        Ok((h, _)) => (CopyStatus::Valid, Some(h.generation), None),
        Err(CopyProblem::NoMagic) => (
            CopyStatus::NoMagic,
            None,
            Some("no keybound magic: zeroed or overwritten".to_string()),
        ),
        Err(CopyProblem::Version(v)) => (
            CopyStatus::OtherVersion,
            None,
            Some(format!("format version {v}")),
        ),
        Err(CopyProblem::Damaged(why)) => (CopyStatus::Damaged, None, Some(why.clone())),
    };
    CopyReport {
        copy: copy_name(copy),
        offset: HEADER_COPY_OFFSETS[copy],
        status,
        generation,
        problem,
    }
}

fn status_text(status: CopyStatus) -> &'static str {
    match status {
        CopyStatus::Valid => "valid",
        CopyStatus::NoMagic => "not a header any more",
        CopyStatus::OtherVersion => "of another format version",
        CopyStatus::Damaged => "damaged",
    }
}

fn problem_text(copy: &CopyReport) -> String {
    copy.problem.clone().unwrap_or_else(|| "valid".into())
}

/// Two valid copies: the same container, and what the older one lacks.
fn compare_copies(
    report: &mut ShallowReport,
    findings: &mut Vec<Finding>,
    used: &Header,
    other: &Header,
    used_index: usize,
) {
    if used.id != other.id {
        findings.push(Finding::damage(
            "header-copies-disagree",
            format!(
                "the header copies belong to different containers (copy {} has id {}, copy {} \
                 has {}): the file was pieced together from two vaults",
                letter(used_index),
                hex::encode(used.id),
                letter(1 - used_index),
                hex::encode(other.id)
            ),
            Some(
                "restore the container from a backup; the copy in use opens only if its data \
                 area is the one it belongs to"
                    .into(),
            ),
        ));
    }
    if used.generation == other.generation {
        findings.push(Finding::note(
            "header-generations-equal",
            format!(
                "both header copies have generation {}; copy A is used (a header write always \
                 raises the generation, so one of them was copied over the other)",
                used.generation
            ),
            None,
        ));
    }
    let checks: [(&'static str, bool); 10] = [
        ("store length", used.store_len != other.store_len),
        ("extent", used.extent != other.extent),
        ("capacity", used.capacity != other.capacity),
        ("seal reserve", used.seal_reserve != other.seal_reserve),
        ("key epoch", used.epoch != other.epoch),
        ("key slots", used.slots != other.slots),
        ("policy", used.policy != other.policy),
        ("rotation state", used.rekeying != other.rekeying),
        ("pending slots", used.pending != other.pending),
        ("store segments", used.segments != other.segments),
    ];
    report.copies_differ_in = checks
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect();
}

fn geometry(header: &Header, file_len: u64) -> Geometry {
    Geometry {
        sector_size: SECTOR_SIZE as u64,
        sealed_sector_size: SEALED_SECTOR_SIZE as u64,
        data_offset: DATA_OFFSET,
        store_len: header.store_len,
        extent_sectors: header.extent,
        capacity_sectors: header.fixed().then_some(header.capacity),
        expected_len: header.required_file_len(),
        file_len,
    }
}

/// The file's length against what the header promises.
fn check_geometry(path: &Path, header: &Header, file_len: u64, findings: &mut Vec<Finding>) {
    let expected = header.required_file_len();
    let sealed = SEALED_SECTOR_SIZE as u64;
    let sectors = header.extent.max(header.capacity);
    if file_len < expected {
        let missing = expected - file_len;
        let first_missing = file_len.saturating_sub(DATA_OFFSET) / sealed;
        findings.push(Finding::damage(
            "truncated",
            format!(
                "the file is truncated: the header says it holds {DATA_OFFSET} + {sectors} × \
                 {sealed} = {expected} bytes, but it has only {file_len}; {missing} bytes are \
                 missing (sectors from {first_missing} on). It was probably cut short while \
                 being copied"
            ),
            Some(format!(
                "restore {} from a backup or copy it again (the missing part cannot be \
                 recreated)",
                path.display()
            )),
        ));
        return;
    }
    if file_len == expected {
        return;
    }
    let extra = file_len - expected;
    let whole = extra / sealed;
    let partial = extra % sealed;
    let shape = if partial == 0 {
        format!("{whole} whole sectors")
    } else {
        format!("{whole} whole sectors and a partial one of {partial} bytes")
    };
    if header.rekeying {
        findings.push(Finding::note(
            "rekey-journal",
            format!(
                "{extra} bytes past the data area: the journal of the interrupted key rotation"
            ),
            None,
        ));
    } else if header.fixed() {
        findings.push(Finding::note(
            "trailing-bytes",
            format!(
                "{extra} bytes ({shape}) past the end of this fixed-size container; they are \
                 not part of the vault and are ignored"
            ),
            None,
        ));
    } else {
        findings.push(Finding::note(
            "beyond-extent",
            format!(
                "{extra} bytes ({shape}) past the extent the header records: sectors written \
                 after the last commit the header knows of (a copy taken while the vault was \
                 mounted, or a crash). They are ignored when the vault opens and reused by its \
                 next writes"
            ),
            None,
        ));
    }
}

/// Notes on states that are not damage but want an action.
fn notes_on_state(
    path: &Path,
    header: &Header,
    info: &super::HeaderInfo,
    findings: &mut Vec<Finding>,
) {
    if let Some(r) = &info.rekey_in_progress {
        findings.push(Finding::note(
            "rekey-unfinished",
            format!(
                "a master-key rotation was interrupted after {} of {} sectors; the vault does \
                 not mount until it is finished",
                r.done_sectors, r.total_sectors
            ),
            Some(format!(
                "run `keybound rekey {}` to finish it",
                path.display()
            )),
        ));
    }
    if !info.pending_slots.is_empty() {
        let slots: Vec<String> = info.pending_slots.iter().map(u8::to_string).collect();
        findings.push(Finding::note(
            "slots-pending",
            format!(
                "key slot(s) {} were carried over by a key rotation and await activation",
                slots.join(", ")
            ),
            Some(format!(
                "each owner runs `keybound rekey {} --activate --slot N` once",
                path.display()
            )),
        ));
    }
    // Past 90% of the seal budget: the next rotation is due (FORMAT.md §4.6).
    if header.seal_reserve >= SEAL_LIMIT / 10 * 9 {
        findings.push(Finding::note(
            "seal-budget",
            format!(
                "{} of the {} sector seals one key may make are used",
                header.seal_reserve, SEAL_LIMIT
            ),
            Some(format!(
                "rotate the master key soon: `keybound rekey {}`",
                path.display()
            )),
        ));
    }
}

/// The keyed MAC of one header copy, checked with the master key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MacStatus {
    Valid,
    /// The copy parses but its MAC does not match: changed without the key,
    /// or left behind by an interrupted rotation (FORMAT.md §7.3).
    Mismatch,
    /// The copy is damaged, so its MAC was not checked.
    NotChecked,
}

impl Container {
    /// The MAC of each header copy under `mk` (FORMAT.md §1.2), without
    /// repairing anything. The copy in use failing means `into_store`
    /// refuses the key.
    pub fn header_macs(&self, mk: &MasterKey) -> Result<[MacStatus; 2], ContainerError> {
        let mac = mac_for(mk, &self.header.id)?;
        Ok([0, 1].map(|i| match self.raw[i].as_deref() {
            None => MacStatus::NotChecked,
            Some(raw) if verify_mac(raw, &mac) => MacStatus::Valid,
            Some(_) => MacStatus::Mismatch,
        }))
    }

    /// Which header copy is in use.
    pub fn copy_in_use(&self) -> HeaderCopy {
        copy_name(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_marker_sits_beside_the_copy() {
        assert_eq!(
            partial_marker(Path::new("/backups/vault.kb")),
            PathBuf::from("/backups/vault.kb.partial")
        );
    }
}
