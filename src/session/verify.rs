//! `keybound verify --deep`: with the master key, check what the keyless check cannot: the
//! header MACs, every sector's authentication, and the filesystem's consistency, naming the
//! files that damage hits.
//!
//! Nothing is ever written to the container: it is opened read-only (`O_RDONLY`), and the
//! filesystem runs over a copy-on-write overlay ([`super::overlay`]) so that redb can replay
//! the last commit of a copy taken while the vault was mounted (which is in the state of a crash)
//! in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use super::SessionError;
use super::overlay::CowStorage;
use crate::container::layout::sector_offset;
use crate::container::{Container, HeaderCopy, MacStatus, SectorStore};
use crate::crypto::MasterKey;
use crate::fs::{CheckReport, Fs, FsError, StepOutcome};

/// The plaintext cache of the read-only store: the check reads everything once, so a cache
/// helps little.
const CACHE_BYTES: usize = 8 << 20;

/// Subject of the damage met while opening the store.
pub const SUBJECT_OPEN: &str =
    "filesystem metadata (the store's header, allocator state and superblock)";

/// Where a deep check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeepProgress {
    /// Authenticating sectors: `done` of `total`.
    Sectors { done: u64, total: u64 },
    /// Checking the filesystem: `done` of about `total` inodes.
    Files { done: u64, total: u64 },
}

/// A sector that fails authentication, and what uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamagedSector {
    pub sector: u64,
    /// Where it starts in the container file.
    pub file_offset: u64,
    /// The paths (or parts of the metadata) whose reads met it.
    pub used_by: Vec<String>,
    /// Reads that met it but could not tell whose record it holds: these subjects' or the next
    /// one's.
    pub near: Vec<String>,
}

/// What `keybound verify --deep` found beyond the keyless check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeepReport {
    /// The keyed MAC of header copies A and B.
    pub header_macs: [MacStatus; 2],
    pub copy_used: HeaderCopy,
    /// Sealed sectors authenticated (the extent).
    pub sectors_checked: u64,
    pub damaged_sectors: Vec<DamagedSector>,
    /// One copy of redb's page-0 shadow pair that does not authenticate beside an intact one:
    /// a torn write, harmless.
    pub page0_stale_copy: Option<u64>,
    /// The filesystem check, if the filesystem could be opened.
    pub filesystem: Option<CheckReport>,
    /// Why the filesystem could not be opened or checked.
    pub filesystem_error: Option<String>,
}

impl DeepReport {
    /// Whether anything found is damage.
    pub fn damaged(&self) -> bool {
        self.header_macs[self.copy_index()] != MacStatus::Valid
            || !self.damaged_sectors.is_empty()
            || self.filesystem_error.is_some()
            || self.filesystem.as_ref().is_some_and(|f| !f.is_clean())
    }

    fn copy_index(&self) -> usize {
        match self.copy_used {
            HeaderCopy::A => 0,
            HeaderCopy::B => 1,
        }
    }
}

/// Which damaged sectors each step of the filesystem check met.
#[derive(Default)]
struct Attribution {
    damaged: BTreeSet<u64>,
    used_by: BTreeMap<u64, BTreeSet<String>>,
    near: BTreeMap<u64, BTreeSet<String>>,
}

impl Attribution {
    fn note(&mut self, overlay: &CowStorage<SectorStore>, subject: &str, outcome: StepOutcome) {
        let pages = overlay.take_damaged_pages();
        let data = overlay.take_damaged_data_sectors();
        let target = match outcome {
            StepOutcome::Clean => return,
            StepOutcome::Damaged => &mut self.used_by,
            StepOutcome::Inconclusive => &mut self.near,
        };
        // redb's pages through the store's map; data sectors are physical already.
        let sectors = pages
            .into_iter()
            .flat_map(|range| overlay.base().sectors_of_redb_pages(range))
            .chain(data.into_iter().flatten());
        for sector in sectors.filter(|s| self.damaged.contains(s)) {
            target
                .entry(sector)
                .or_default()
                .insert(subject.to_string());
        }
    }
}

/// Check `container` with its master key: the header MACs, every sector, the filesystem.
/// `progress` sees each phase advance. Fails only when the check cannot run (an I/O error, an
/// unfinished key rotation); damage is in the report.
pub fn verify_deep(
    container: Container,
    master_key: MasterKey,
    progress: &mut dyn FnMut(DeepProgress),
) -> Result<DeepReport, SessionError> {
    let header_macs = container.header_macs(&master_key)?;
    let copy_used = container.copy_in_use();
    let used = match copy_used {
        HeaderCopy::A => 0,
        HeaderCopy::B => 1,
    };
    let mut report = DeepReport {
        header_macs,
        copy_used,
        sectors_checked: 0,
        damaged_sectors: Vec::new(),
        page0_stale_copy: None,
        filesystem: None,
        filesystem_error: None,
    };
    if header_macs[used] != MacStatus::Valid {
        // The store would refuse this key; nothing behind the header can be trusted.
        return Ok(report);
    }
    let store = container.into_store_with_cache(master_key, CACHE_BYTES)?;
    let scan = store.scan_sectors(&mut |done, total| {
        progress(DeepProgress::Sectors { done, total });
    })?;
    report.sectors_checked = scan.checked;
    report.page0_stale_copy = scan.page0_stale_copy;

    let mut who = Attribution {
        damaged: scan.damaged.iter().copied().collect(),
        ..Attribution::default()
    };
    let overlay = Arc::new(CowStorage::new(store).map_err(|source| SessionError::Io {
        what: "reading the store's length".into(),
        source,
    })?);
    match Fs::open_for_check(overlay.clone()) {
        Ok(mut fs) => {
            who.note(&overlay, SUBJECT_OPEN, StepOutcome::Damaged);
            let checked = fs.check(&mut |step| {
                who.note(&overlay, step.subject, step.outcome);
                progress(DeepProgress::Files {
                    done: step.inodes_done,
                    total: step.inodes_total,
                });
            });
            match checked {
                Ok(check) => report.filesystem = Some(check),
                Err(e) => report.filesystem_error = Some(e.to_string()),
            }
            drop(fs);
        }
        Err(e) => {
            who.note(&overlay, SUBJECT_OPEN, StepOutcome::Damaged);
            let met_damage = crate::fs::Storage::damaged_reads(&*overlay) > 0;
            report.filesystem_error = Some(match e {
                _ if met_damage || matches!(e, FsError::Damaged) => {
                    "the store's own structures (its header, allocator state or superblock) are \
                     damaged: the filesystem cannot be opened, so no file can be read"
                        .into()
                }
                other => format!("the filesystem cannot be opened: {other}"),
            });
        }
    }
    tracing::debug!(
        overlay_bytes = overlay.overlay_bytes(),
        "deep check done; the overlay is dropped"
    );
    report.damaged_sectors = scan
        .damaged
        .iter()
        .map(|&sector| DamagedSector {
            sector,
            file_offset: sector_offset(sector),
            used_by: who
                .used_by
                .remove(&sector)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default(),
            near: who
                .near
                .remove(&sector)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default(),
        })
        .collect();
    Ok(report)
}
