//! The header: two copies (A, B), each with a generation, an unkeyed
//! checksum (to pick an intact copy before any key is known) and a keyed MAC
//! (checked after unlock). FORMAT.md §1.
//!
//! Parsing is total: any bytes give a [`Header`] or a reason, never a panic.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::layout::*;
use super::slot::{self, SlotInfo, get_u32, get_u64, put_u32};
use crate::crypto::{CONTAINER_ID_LEN, HeaderMac, MAC_LEN};

/// Vault policy, stored for the session layer to enforce. All zero = none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub min_password_len: u16,
    /// Required PIV PIN policy (0 = no requirement).
    pub pin_policy: u8,
    pub argon_min_memory_kib: u32,
    pub argon_min_iterations: u32,
    pub argon_min_parallelism: u32,
    /// Lock after this many idle seconds (0 = never).
    pub idle_timeout_s: u32,
}

/// One parsed header copy.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub generation: u64,
    pub id: [u8; CONTAINER_ID_LEN],
    /// Fixed size in sectors; 0 = the container grows.
    pub capacity: u64,
    pub extent: u64,
    pub seal_reserve: u64,
    pub epoch: u32,
    pub store_len: u64,
    pub policy: Policy,
    /// The raw key slots, `SLOT_COUNT × SLOT_SIZE` bytes.
    pub slots: Vec<u8>,
    /// The reserved tail (random at creation, carried over unchanged; its
    /// first bytes hold the rekey record while `rekeying`).
    pub reserved: Vec<u8>,
    /// Sectors below the extent never sealed, as sorted disjoint ranges
    /// `start..end` (FORMAT.md §4.2): they read as zeros. Empty in version 1.
    pub unsealed: Vec<(u64, u64)>,
    /// A master-key rotation is in progress (FORMAT.md §7).
    pub rekeying: bool,
    /// Bit i: key slot i awaits activation after a rekey (FORMAT.md §7.4).
    pub pending: u8,
    /// Store pages of the fsync log (FORMAT.md §4.9); 0 before version 3.
    pub fsync_log_pages: u64,
    /// The store segment map as runs `(first physical segment, segments)`, in
    /// store order (FORMAT.md §4.10); `None` (before version 4): the identity
    /// map. Written over the end of `reserved` when present.
    pub segments: Option<Vec<(u32, u32)>>,
    /// The format version this header was read as (or written as last).
    pub version: u16,
}

/// Why a header copy cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CopyProblem {
    /// No magic: not a keybound header at all.
    NoMagic,
    /// A keybound header of another format version.
    Version(u16),
    /// Checksum mismatch, truncated, or a field out of range.
    Damaged(String),
}

impl Header {
    /// How many sectors the unsealed ranges hold.
    pub fn unsealed_sectors(&self) -> u64 {
        self.unsealed.iter().map(|(start, end)| end - start).sum()
    }

    pub fn slot_bytes(&self, index: usize) -> &[u8] {
        &self.slots[index * SLOT_SIZE..(index + 1) * SLOT_SIZE]
    }

    pub fn set_slot_bytes(&mut self, index: usize, bytes: &[u8]) {
        self.slots[index * SLOT_SIZE..(index + 1) * SLOT_SIZE].copy_from_slice(bytes);
    }

    pub fn slot_infos(&self) -> Vec<SlotInfo> {
        (0..SLOT_COUNT)
            .filter_map(|i| slot::decode(i as u8, self.slot_bytes(i)).ok().flatten())
            .collect()
    }

    pub fn fixed(&self) -> bool {
        self.capacity > 0
    }

    /// The version this header is written as: 4 with a segment map, 3 without.
    pub fn format_version(&self) -> u16 {
        if self.segments.is_some() {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_WITHOUT_SEGMENTS
        }
    }

    /// The file length the header promises: the data area up to the extent,
    /// or all of it for a preallocated container.
    pub fn required_file_len(&self) -> u64 {
        file_len_for_sectors(self.extent.max(self.capacity))
    }

    /// Serialize as copy `copy` (0 = A, 1 = B), MAC and checksum included.
    pub fn encode(&self, copy: usize, mac: &HeaderMac) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_COPY_SIZE];
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(MAGIC);
        b[H_VERSION..H_VERSION + 2].copy_from_slice(&self.format_version().to_le_bytes());
        b[H_COPY_INDEX] = copy as u8;
        put_u64(&mut b, H_GENERATION, self.generation);
        b[H_ID..H_ID + CONTAINER_ID_LEN].copy_from_slice(&self.id);
        put_u32(&mut b, H_SECTOR_SIZE, SECTOR_SIZE as u32);
        let mut flags = if self.fixed() { FLAG_FIXED_SIZE } else { 0 };
        if self.rekeying {
            flags |= FLAG_REKEY;
        }
        put_u32(&mut b, H_FLAGS, flags);
        b[H_PENDING_SLOTS] = self.pending;
        let log_pages = u16::try_from(self.fsync_log_pages).expect("checked at decode and create");
        b[H_FSYNC_LOG_PAGES..H_FSYNC_LOG_PAGES + 2].copy_from_slice(&log_pages.to_le_bytes());
        put_u64(&mut b, H_DATA_OFFSET, DATA_OFFSET);
        put_u64(&mut b, H_CAPACITY, self.capacity);
        put_u64(&mut b, H_EXTENT, self.extent);
        put_u64(&mut b, H_SEAL_RESERVE, self.seal_reserve);
        put_u32(&mut b, H_KEY_EPOCH, self.epoch);
        put_u64(&mut b, H_STORE_LEN, self.store_len);
        encode_policy(&self.policy, &mut b[H_POLICY..H_POLICY + POLICY_LEN]);
        b[H_SLOTS..H_RESERVED_TAIL].copy_from_slice(&self.slots);
        b[H_RESERVED_TAIL..H_UNSEALED].copy_from_slice(&self.reserved);
        if let Some(runs) = &self.segments {
            encode_segments(runs, &mut b[H_SEGMENTS..H_UNSEALED]);
        }
        encode_unsealed(&self.unsealed, &mut b[H_UNSEALED..H_MAC]);
        let tag = mac.sign(&mac_input(&b));
        b[H_MAC..H_MAC + MAC_LEN].copy_from_slice(&tag);
        let sum = Sha256::digest(&b[..H_CHECKSUM]);
        b[H_CHECKSUM..].copy_from_slice(&sum);
        b
    }

    /// Parse the bytes found at copy `copy`'s offset (possibly short).
    pub fn decode(b: &[u8], copy: usize) -> Result<Header, CopyProblem> {
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(CopyProblem::NoMagic);
        }
        if b.len() < HEADER_COPY_SIZE {
            return Err(CopyProblem::Damaged("cut short".into()));
        }
        let version = u16::from_le_bytes([b[H_VERSION], b[H_VERSION + 1]]);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(CopyProblem::Version(version));
        }
        if Sha256::digest(&b[..H_CHECKSUM]).as_slice() != &b[H_CHECKSUM..HEADER_COPY_SIZE] {
            return Err(CopyProblem::Damaged("checksum mismatch".into()));
        }
        Self::decode_fields(&b[..HEADER_COPY_SIZE], copy, version).map_err(CopyProblem::Damaged)
    }

    fn decode_fields(b: &[u8], copy: usize, version: u16) -> Result<Header, String> {
        let zero = |r: std::ops::Range<usize>| b[r].iter().all(|&x| x == 0);
        if usize::from(b[H_COPY_INDEX]) != copy {
            return Err(format!("copy index {} at copy {copy}", b[H_COPY_INDEX]));
        }
        if !zero(H_RESERVED_1) || !zero(H_RESERVED_2) || !zero(H_RESERVED_3) {
            return Err("non-zero reserved bytes".into());
        }
        if get_u32(b, H_SECTOR_SIZE) != SECTOR_SIZE as u32 {
            return Err("sector size is not 4096".into());
        }
        if get_u64(b, H_DATA_OFFSET) != DATA_OFFSET {
            return Err("data area offset is not 65536".into());
        }
        let flags = get_u32(b, H_FLAGS);
        let header = Header {
            generation: get_u64(b, H_GENERATION),
            id: b[H_ID..H_ID + CONTAINER_ID_LEN].try_into().expect("length"),
            capacity: get_u64(b, H_CAPACITY),
            extent: get_u64(b, H_EXTENT),
            seal_reserve: get_u64(b, H_SEAL_RESERVE),
            epoch: get_u32(b, H_KEY_EPOCH),
            store_len: get_u64(b, H_STORE_LEN),
            policy: decode_policy(&b[H_POLICY..H_POLICY + POLICY_LEN])?,
            slots: b[H_SLOTS..H_RESERVED_TAIL].to_vec(),
            reserved: b[H_RESERVED_TAIL..H_UNSEALED].to_vec(),
            // Version 1 kept random bytes where the list now is.
            unsealed: match version {
                1 => Vec::new(),
                _ => decode_unsealed(&b[H_UNSEALED..H_MAC])?,
            },
            rekeying: flags & FLAG_REKEY != 0,
            pending: b[H_PENDING_SLOTS],
            // Reserved (zero) before version 3.
            fsync_log_pages: u64::from(u16::from_le_bytes([
                b[H_FSYNC_LOG_PAGES],
                b[H_FSYNC_LOG_PAGES + 1],
            ])),
            // Random bytes (the reserved tail) before version 4.
            segments: match version {
                ..=3 => None,
                _ => Some(decode_segments(&b[H_SEGMENTS..H_UNSEALED])?),
            },
            version,
        };
        if version < 3 && header.fsync_log_pages != 0 {
            return Err("non-zero reserved bytes".into());
        }
        let known = FLAG_FIXED_SIZE | FLAG_REKEY;
        if flags & !known != 0 || (flags & FLAG_FIXED_SIZE != 0) != header.fixed() {
            return Err(format!("flags {flags:#x} disagree with the capacity"));
        }
        header.check_ranges()?;
        for i in 0..SLOT_COUNT {
            slot::decode(i as u8, header.slot_bytes(i))?;
        }
        super::rekey::check_header(&header)?;
        Ok(header)
    }

    fn check_ranges(&self) -> Result<(), String> {
        if self.fixed() && self.capacity < MIN_FIXED_SECTORS + self.fsync_log_pages {
            return Err(format!(
                "fsync log of {} pages does not fit the capacity {}",
                self.fsync_log_pages, self.capacity
            ));
        }
        if self.store_len > MAX_STORE_LEN {
            return Err(format!("store length {} is out of range", self.store_len));
        }
        // With the identity map the store is all there is; with a segment map
        // the extent also covers data segments (FORMAT.md §4.10).
        let extent_limit = match self.segments {
            None => sectors_for_len(self.store_len),
            Some(_) => MAX_SECTORS,
        };
        if self.extent > extent_limit {
            return Err(format!(
                "extent {} exceeds the store length {}",
                self.extent, self.store_len
            ));
        }
        if self.fixed()
            && (self.capacity < MIN_FIXED_SECTORS
                || self.capacity > MAX_SECTORS
                || self.extent > self.capacity)
        {
            return Err(format!(
                "capacity {} / extent {} out of range",
                self.capacity, self.extent
            ));
        }
        if self.seal_reserve > SEAL_LIMIT {
            return Err(format!("seal reserve {} out of range", self.seal_reserve));
        }
        // Sorted, disjoint, below the extent; never page 0's shadow pair.
        let mut floor = 2;
        for &(start, end) in &self.unsealed {
            if start < floor || end <= start || end > self.extent {
                return Err(format!(
                    "unsealed range {start}..{end} out of order or beyond the extent {}",
                    self.extent
                ));
            }
            floor = end;
        }
        Ok(())
    }
}

fn encode_segments(runs: &[(u32, u32)], b: &mut [u8]) {
    assert!(
        runs.len() <= MAX_SEGMENT_RUNS,
        "the store keeps at most {MAX_SEGMENT_RUNS} segment runs"
    );
    b.fill(0);
    put_u32(b, 0, runs.len() as u32);
    for (i, &(first, count)) in runs.iter().enumerate() {
        put_u32(b, 8 + 8 * i, first);
        put_u32(b, 12 + 8 * i, count);
    }
}

/// The segment map: at least one run, the first at physical segment 0 (page
/// 0's shadow pair), each run non-empty and after the previous one, all
/// within [`MAX_SECTORS`].
fn decode_segments(b: &[u8]) -> Result<Vec<(u32, u32)>, String> {
    let count = get_u32(b, 0) as usize;
    if count == 0 || count > MAX_SEGMENT_RUNS || get_u32(b, 4) != 0 {
        return Err(format!("segment run count {count} out of range"));
    }
    if b[8 + 8 * count..].iter().any(|&x| x != 0) {
        return Err("non-zero bytes after the segment runs".into());
    }
    let runs: Vec<(u32, u32)> = (0..count)
        .map(|i| (get_u32(b, 8 + 8 * i), get_u32(b, 12 + 8 * i)))
        .collect();
    let mut floor = 0u64;
    for (i, &(first, n)) in runs.iter().enumerate() {
        let (first, n) = (u64::from(first), u64::from(n));
        let end = first + n;
        if n == 0 || (i == 0 && first != 0) || first < floor || end * SEGMENT_SECTORS > MAX_SECTORS
        {
            return Err(format!(
                "segment run {first}+{n} out of order or out of range"
            ));
        }
        floor = end;
    }
    Ok(runs)
}

fn encode_unsealed(ranges: &[(u64, u64)], b: &mut [u8]) {
    assert!(
        ranges.len() <= MAX_UNSEALED_RANGES,
        "the store keeps at most {MAX_UNSEALED_RANGES} unsealed ranges"
    );
    b.fill(0);
    put_u32(b, 0, ranges.len() as u32);
    for (i, &(start, end)) in ranges.iter().enumerate() {
        put_u64(b, 8 + 16 * i, start);
        put_u64(b, 16 + 16 * i, end);
    }
}

fn decode_unsealed(b: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let count = get_u32(b, 0) as usize;
    if count > MAX_UNSEALED_RANGES || get_u32(b, 4) != 0 {
        return Err(format!("unsealed-range count {count} out of range"));
    }
    if b[8 + 16 * count..].iter().any(|&x| x != 0) {
        return Err("non-zero bytes after the unsealed ranges".into());
    }
    Ok((0..count)
        .map(|i| (get_u64(b, 8 + 16 * i), get_u64(b, 16 + 16 * i)))
        .collect())
}

/// The bytes the MAC covers: 0..H_MAC, with the copy index byte as 0, so the
/// MAC says nothing about where the copy sits.
fn mac_input(b: &[u8]) -> Vec<u8> {
    let mut input = b[..H_MAC].to_vec();
    input[H_COPY_INDEX] = 0;
    input
}

/// A valid raw header copy moved to position `copy` (0 = A, 1 = B): only
/// the copy index and the checksum change; the MAC does not cover the index,
/// so it stays valid. For header backups and restores.
pub(crate) fn reindex(raw: &[u8], copy: usize) -> Vec<u8> {
    let mut b = raw[..HEADER_COPY_SIZE].to_vec();
    b[H_COPY_INDEX] = copy as u8;
    let sum = Sha256::digest(&b[..H_CHECKSUM]);
    b[H_CHECKSUM..].copy_from_slice(&sum);
    b
}

/// Check the keyed MAC of a raw header copy.
pub(crate) fn verify_mac(raw: &[u8], mac: &HeaderMac) -> bool {
    raw.len() >= HEADER_COPY_SIZE
        && mac
            .verify(&mac_input(raw), &raw[H_MAC..H_MAC + MAC_LEN])
            .is_ok()
}

fn encode_policy(p: &Policy, b: &mut [u8]) {
    b[P_MIN_PASSWORD_LEN..P_MIN_PASSWORD_LEN + 2]
        .copy_from_slice(&p.min_password_len.to_le_bytes());
    b[P_PIN_POLICY] = p.pin_policy;
    put_u32(b, P_ARGON_MIN_MEMORY_KIB, p.argon_min_memory_kib);
    put_u32(b, P_ARGON_MIN_ITERATIONS, p.argon_min_iterations);
    put_u32(b, P_ARGON_MIN_PARALLELISM, p.argon_min_parallelism);
    put_u32(b, P_IDLE_TIMEOUT_S, p.idle_timeout_s);
}

fn decode_policy(b: &[u8]) -> Result<Policy, String> {
    if b[P_RESERVED_1] != 0 || b[P_RESERVED_2].iter().any(|&x| x != 0) {
        return Err("non-zero reserved policy bytes".into());
    }
    Ok(Policy {
        min_password_len: u16::from_le_bytes([b[P_MIN_PASSWORD_LEN], b[P_MIN_PASSWORD_LEN + 1]]),
        pin_policy: b[P_PIN_POLICY],
        argon_min_memory_kib: get_u32(b, P_ARGON_MIN_MEMORY_KIB),
        argon_min_iterations: get_u32(b, P_ARGON_MIN_ITERATIONS),
        argon_min_parallelism: get_u32(b, P_ARGON_MIN_PARALLELISM),
        idle_timeout_s: get_u32(b, P_IDLE_TIMEOUT_S),
    })
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// What was found at both copy offsets.
#[derive(Debug)]
pub(crate) struct Copies {
    /// The parsed copy and its raw bytes, per copy.
    pub parsed: [Result<(Header, Vec<u8>), CopyProblem>; 2],
}

/// The outcome of choosing between the copies.
pub(crate) enum Choice {
    /// Use copy `used`; the other is valid too, or not (`other_valid`).
    Use {
        used: usize,
        other_valid: bool,
    },
    NotAContainer,
    UnsupportedVersion(u16),
    BothDamaged,
}

impl Copies {
    /// Parse the header area (the first 32 KiB of the file, or less if the
    /// file is shorter).
    pub fn parse(area: &[u8]) -> Copies {
        let at = |copy: usize| {
            let start = (HEADER_COPY_OFFSETS[copy] as usize).min(area.len());
            let end = (start + HEADER_COPY_SIZE).min(area.len());
            let raw = &area[start..end];
            Header::decode(raw, copy).map(|h| (h, raw.to_vec()))
        };
        Copies {
            parsed: [at(0), at(1)],
        }
    }

    /// The valid copy with the higher generation.
    pub fn choose(&self) -> Choice {
        let generation = |c: usize| self.parsed[c].as_ref().ok().map(|(h, _)| h.generation);
        match (generation(0), generation(1)) {
            (Some(a), Some(b)) => Choice::Use {
                used: usize::from(b > a),
                other_valid: true,
            },
            (Some(_), None) => Choice::Use {
                used: 0,
                other_valid: false,
            },
            (None, Some(_)) => Choice::Use {
                used: 1,
                other_valid: false,
            },
            (None, None) => {
                let problems = [&self.parsed[0], &self.parsed[1]].map(|p| p.as_ref().err());
                if let Some(CopyProblem::Version(v)) = problems
                    .iter()
                    .flatten()
                    .find(|p| matches!(p, CopyProblem::Version(_)))
                {
                    Choice::UnsupportedVersion(*v)
                } else if problems.iter().all(|p| p == &Some(&CopyProblem::NoMagic)) {
                    Choice::NotAContainer
                } else {
                    Choice::BothDamaged
                }
            }
        }
    }
}

/// Writes header copies by the A/B rule: always the older (or invalid) copy,
/// synced before the call returns, so the other copy stays intact meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct HeaderWriter {
    /// Generation of each copy, if that copy is valid on disk.
    generations: [Option<u64>; 2],
}

impl HeaderWriter {
    pub fn new(generations: [Option<u64>; 2]) -> Self {
        HeaderWriter { generations }
    }

    pub fn both_valid(&self) -> bool {
        self.generations.iter().all(Option::is_some)
    }

    /// The copy the next write goes to: an invalid one, else the older.
    pub fn target(&self) -> usize {
        match self.generations {
            [None, _] => 0,
            [_, None] => 1,
            [Some(a), Some(b)] => usize::from(b < a),
        }
    }

    /// Write `header` with the next generation to the older copy and
    /// `fdatasync` it. On success `header.generation` is the new generation.
    pub fn write(
        &mut self,
        file: &File,
        header: &mut Header,
        mac: &HeaderMac,
    ) -> std::io::Result<usize> {
        let target = self.target();
        let next = self.generations.iter().flatten().max().map_or(1, |g| g + 1);
        header.generation = next;
        let bytes = header.encode(target, mac);
        header.version = header.format_version();
        // Until the write completes the target copy may be torn; mark it so
        // that a failed write never leaves us trusting it.
        self.generations[target] = None;
        file.write_all_at(&bytes, HEADER_COPY_OFFSETS[target])?;
        file.sync_data()?;
        self.generations[target] = Some(next);
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::fill_random;
    use crate::crypto::{KeyPurpose, MasterKey};

    fn mac() -> HeaderMac {
        let mk = MasterKey::generate().unwrap();
        HeaderMac::new(&mk.derive(KeyPurpose::HeaderMac, &[1; 16]).unwrap()).unwrap()
    }

    fn sample() -> Header {
        let mut slots = Vec::new();
        for _ in 0..SLOT_COUNT {
            slots.extend(slot::empty().unwrap());
        }
        let mut reserved = vec![0u8; H_UNSEALED - H_RESERVED_TAIL];
        fill_random(&mut reserved).unwrap();
        Header {
            generation: 9,
            id: [1; 16],
            capacity: 0,
            extent: 5,
            seal_reserve: SEAL_RESERVE_STEP,
            epoch: 0,
            store_len: 4 * 4096,
            policy: Policy {
                min_password_len: 12,
                idle_timeout_s: 600,
                ..Policy::default()
            },
            slots,
            reserved,
            unsealed: vec![(2, 3)],
            rekeying: false,
            pending: 0,
            fsync_log_pages: 0,
            segments: None,
            version: FORMAT_VERSION_WITHOUT_SEGMENTS,
        }
    }

    #[test]
    fn encode_decode_round_trip_and_mac() {
        let mac = mac();
        let h = sample();
        let raw = h.encode(1, &mac);
        let back = Header::decode(&raw, 1).unwrap();
        assert_eq!(back.generation, 9);
        assert_eq!(back.policy, h.policy);
        assert_eq!(back.encode(1, &mac), raw, "decode is lossless");
        assert!(verify_mac(&raw, &mac));
        assert!(!verify_mac(&raw, &self::mac()));
        // The copy index is fixed by position.
        assert!(matches!(
            Header::decode(&raw, 0),
            Err(CopyProblem::Damaged(_))
        ));
        // Same content as copy A has the same MAC (the index is not covered).
        let a = h.encode(0, &mac);
        assert_eq!(a[H_MAC..H_MAC + 32], raw[H_MAC..H_MAC + 32]);
    }

    #[test]
    fn every_flipped_bit_is_caught_by_the_checksum() {
        let raw = sample().encode(0, &mac());
        for byte in (0..HEADER_COPY_SIZE).step_by(61) {
            let mut b = raw.clone();
            b[byte] ^= 0x10;
            assert!(Header::decode(&b, 0).is_err(), "byte {byte}");
        }
    }

    #[test]
    fn out_of_range_fields_are_damage_even_with_a_good_checksum() {
        let mac = mac();
        let mut h = sample();
        h.extent = 100; // beyond the store length
        let raw = h.encode(0, &mac);
        assert!(matches!(
            Header::decode(&raw, 0),
            Err(CopyProblem::Damaged(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut buf = vec![0u8; 2 * HEADER_COPY_SIZE];
        for round in 0..300usize {
            fill_random(&mut buf).unwrap();
            if round % 2 == 0 {
                buf[..8].copy_from_slice(MAGIC);
                buf[HEADER_COPY_SIZE..HEADER_COPY_SIZE + 8].copy_from_slice(MAGIC);
                buf[8] = 1;
                buf[9] = 0;
            }
            let len = round * 109 % buf.len();
            let copies = Copies::parse(&buf[..len]);
            let _ = copies.choose();
        }
    }

    #[test]
    fn choice_prefers_higher_valid_generation() {
        let mac = mac();
        let mut h = sample();
        let mut area = vec![0u8; 2 * HEADER_COPY_SIZE];
        h.generation = 3;
        area[..HEADER_COPY_SIZE].copy_from_slice(&h.encode(0, &mac));
        h.generation = 4;
        area[HEADER_COPY_SIZE..].copy_from_slice(&h.encode(1, &mac));
        assert!(matches!(
            Copies::parse(&area).choose(),
            Choice::Use {
                used: 1,
                other_valid: true
            }
        ));
        area[HEADER_COPY_SIZE + 100] ^= 1;
        assert!(matches!(
            Copies::parse(&area).choose(),
            Choice::Use {
                used: 0,
                other_valid: false
            }
        ));
        area[100] ^= 1;
        assert!(matches!(Copies::parse(&area).choose(), Choice::BothDamaged));
        assert!(matches!(
            Copies::parse(&[0u8; 1000]).choose(),
            Choice::NotAContainer
        ));
        let mut future = h.encode(0, &mac);
        future[H_VERSION] = 5;
        assert!(matches!(
            Copies::parse(&future).choose(),
            Choice::UnsupportedVersion(5)
        ));
    }

    /// `h` encoded, then changed by `edit` with the checksum fixed up.
    fn edited(h: &Header, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut raw = h.encode(0, &mac());
        edit(&mut raw);
        let sum = Sha256::digest(&raw[..H_CHECKSUM]);
        raw[H_CHECKSUM..].copy_from_slice(&sum);
        raw
    }

    #[test]
    fn a_version_1_copy_reads_with_no_unsealed_ranges() {
        // Version 1 kept random bytes where the list now is.
        let v2 = sample();
        let raw = edited(&v2, |b| {
            b[H_VERSION] = 1;
            b[H_UNSEALED..H_MAC].fill(0xa5);
        });
        let v1 = Header::decode(&raw, 0).unwrap();
        assert!(v1.unsealed.is_empty());
        assert!(v1.reserved == v2.reserved);
    }

    #[test]
    fn unsealed_ranges_out_of_order_or_beyond_the_extent_are_damage() {
        let mut h = sample(); // extent 5
        h.unsealed = vec![(2, 3), (4, 5)];
        assert_eq!(
            Header::decode(&h.encode(0, &mac()), 0).unwrap().unsealed,
            h.unsealed
        );
        for bad in [
            vec![(2, 6)],         // beyond the extent
            vec![(1, 2)],         // page 0's shadow pair
            vec![(3, 3)],         // empty
            vec![(4, 5), (2, 3)], // out of order
            vec![(2, 4), (3, 5)], // overlapping
        ] {
            h.unsealed = bad.clone();
            let problem = Header::decode(&h.encode(0, &mac()), 0).unwrap_err();
            assert!(matches!(problem, CopyProblem::Damaged(_)), "{bad:?}");
        }
        for edit in [
            |b: &mut [u8]| b[H_UNSEALED] = 65,     // count over the limit
            |b: &mut [u8]| b[H_UNSEALED + 4] = 1,  // reserved u32
            |b: &mut [u8]| b[H_UNSEALED + 30] = 1, // past the last range
        ] {
            let raw = edited(&sample(), edit);
            assert!(matches!(
                Header::decode(&raw, 0),
                Err(CopyProblem::Damaged(_))
            ));
        }
    }

    #[test]
    fn a_segment_map_makes_version_4_and_bad_maps_are_damage() {
        let mac = mac();
        let mut h = sample();
        assert_eq!(h.format_version(), 3);
        h.segments = Some(vec![(0, 2), (5, 1), (9, 3)]);
        h.extent = 12 * SEGMENT_SECTORS; // beyond the store length: data segments
        let raw = h.encode(0, &mac);
        assert_eq!(raw[H_VERSION], 4);
        let back = Header::decode(&raw, 0).unwrap();
        assert_eq!(back.segments, h.segments);
        assert_eq!(back.version, 4);
        assert_eq!(back.encode(0, &mac), raw, "decode is lossless");
        // Without a map the extent may not pass the store length.
        h.segments = None;
        assert!(Header::decode(&h.encode(0, &mac), 0).is_err());
        for bad in [
            vec![],               // no run
            vec![(1, 2)],         // not starting at segment 0
            vec![(0, 2), (1, 1)], // overlapping
            vec![(0, 2), (5, 0)], // empty run
            vec![(0, 1), (u32::MAX, 1)],
        ] {
            h.segments = Some(bad.clone());
            let problem = Header::decode(&h.encode(0, &mac), 0).unwrap_err();
            assert!(matches!(problem, CopyProblem::Damaged(_)), "{bad:?}");
        }
        h.segments = Some(vec![(0, 1)]);
        for edit in [
            |b: &mut [u8]| b[H_SEGMENTS] = 129,    // count over the limit
            |b: &mut [u8]| b[H_SEGMENTS + 4] = 1,  // reserved u32
            |b: &mut [u8]| b[H_SEGMENTS + 20] = 1, // past the last run
        ] {
            let raw = edited(&h, edit);
            assert!(matches!(
                Header::decode(&raw, 0),
                Err(CopyProblem::Damaged(_))
            ));
        }
        // Version 3 kept random bytes where the map is: no map.
        let raw = edited(&sample(), |b| {
            b[H_SEGMENTS..H_UNSEALED].fill(0xa5);
        });
        assert_eq!(Header::decode(&raw, 0).unwrap().segments, None);
    }

    #[test]
    fn writer_targets_invalid_then_older_copy() {
        assert_eq!(HeaderWriter::new([Some(5), Some(6)]).target(), 0);
        assert_eq!(HeaderWriter::new([Some(7), Some(6)]).target(), 1);
        assert_eq!(HeaderWriter::new([Some(7), None]).target(), 1);
        assert_eq!(HeaderWriter::new([None, Some(6)]).target(), 0);
        assert_eq!(HeaderWriter::new([None, None]).target(), 0);
        assert!(!HeaderWriter::new([None, Some(6)]).both_valid());
    }
}
