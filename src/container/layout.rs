//! Every byte offset and size of the container format (docs/FORMAT.md), in
//! one place, so a reader can check the code against the document.
//!
//! All integers on disk are little-endian.

use crate::crypto::{CONTAINER_ID_LEN, NONCE_LEN, TAG_LEN};

// ---------------------------------------------------------------- file ----

/// Plaintext bytes per sector, and redb's page size.
pub const SECTOR_SIZE: usize = 4096;

/// Bytes one sealed sector takes in the file: nonce ‖ ciphertext ‖ tag.
pub const SEALED_SECTOR_SIZE: usize = NONCE_LEN + SECTOR_SIZE + TAG_LEN;

/// Size of one header copy.
pub const HEADER_COPY_SIZE: usize = 16384;

/// Offsets of header copy A and header copy B.
pub const HEADER_COPY_OFFSETS: [u64; 2] = [0, HEADER_COPY_SIZE as u64];

/// Start of the reserved area after the two header copies (random at creation).
pub const RESERVED_AREA_OFFSET: u64 = 2 * HEADER_COPY_SIZE as u64;

/// Start of the data area: sealed sector 0.
pub const DATA_OFFSET: u64 = 65536;

/// "KEYBOUND": what `file(1)` and `keybound info` recognise.
pub const MAGIC: &[u8; 8] = b"KEYBOUND";

/// The newest format version this build writes. Version 1 (no unsealed
/// ranges) is read too: it is version 2 with an empty list; version 2 is
/// version 3 without an fsync log; version 3 is version 4 without a store
/// segment map (the identity map). A header is written as version 3 as long
/// as it has no segment map, as version 4 once it has one (FORMAT.md §4.10).
pub const FORMAT_VERSION: u16 = 4;

/// The version a header without a store segment map is written as.
pub const FORMAT_VERSION_WITHOUT_SEGMENTS: u16 = 3;

/// The oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u16 = 1;

// -------------------------------------------------------------- header ----

pub const H_MAGIC: usize = 0; // 8
pub const H_VERSION: usize = 8; // u16
pub const H_COPY_INDEX: usize = 10; // u8: 0 = A, 1 = B
pub const H_RESERVED_1: std::ops::Range<usize> = 11..16; // zero
pub const H_GENERATION: usize = 16; // u64
pub const H_ID: usize = 24; // 16
pub const H_SECTOR_SIZE: usize = 40; // u32 = 4096
pub const H_FLAGS: usize = 44; // u32
pub const H_DATA_OFFSET: usize = 48; // u64 = 65536
pub const H_CAPACITY: usize = 56; // u64: fixed size in sectors, 0 = grows
pub const H_EXTENT: usize = 64; // u64: sectors 0..extent sealed at least once
pub const H_SEAL_RESERVE: usize = 72; // u64: seal budget reserved
pub const H_KEY_EPOCH: usize = 80; // u32
pub const H_PENDING_SLOTS: usize = 84; // u8: bit i = slot i awaits activation after a rekey
pub const H_RESERVED_2: std::ops::Range<usize> = 85..86; // zero
pub const H_FSYNC_LOG_PAGES: usize = 86; // u16: store pages 1..=n hold the fsync log (version 3)
pub const H_STORE_LEN: usize = 88; // u64: redb's logical length
pub const H_POLICY: usize = 96; // 32 bytes, see P_*
pub const H_SLOTS: usize = 128; // SLOT_COUNT × SLOT_SIZE
pub const H_RESERVED_TAIL: usize = H_SLOTS + SLOT_COUNT * SLOT_SIZE; // 8320, random
pub const H_SEGMENTS: usize = H_UNSEALED - SEGMENTS_LEN; // 14224: the store segment map (version 4)
pub const H_UNSEALED: usize = H_MAC - UNSEALED_LEN; // 15256: the unsealed ranges (version 2)
pub const H_MAC: usize = 16288; // 32: HMAC-SHA256 of 0..16288 (copy index byte as 0)
pub const H_RESERVED_3: std::ops::Range<usize> = 16320..16352; // zero
pub const H_CHECKSUM: usize = 16352; // 32: SHA-256 of 0..16352

/// The unsealed-ranges list (FORMAT.md §4.2): u32 count, u32 zero, then
/// `MAX_UNSEALED_RANGES` pairs of u64 (start, end), unused pairs zero.
pub const MAX_UNSEALED_RANGES: usize = 64;
pub const UNSEALED_LEN: usize = 8 + MAX_UNSEALED_RANGES * 16; // 1032

/// The store segment map (FORMAT.md §4.10): u32 run count (1 ..=
/// `MAX_SEGMENT_RUNS`), u32 zero, then `MAX_SEGMENT_RUNS` pairs of u32
/// (first physical segment, segments), unused pairs zero. Random bytes (part
/// of the reserved tail) before version 4.
pub const MAX_SEGMENT_RUNS: usize = 128;
pub const SEGMENTS_LEN: usize = 8 + MAX_SEGMENT_RUNS * 8; // 1032

/// Physical sectors per segment (4 MiB of plaintext): the unit in which the
/// data area is divided between redb's store and file data (FORMAT.md §4.10).
pub const SEGMENT_SECTORS: u64 = 1024;

/// Header flag bit 0: the container was preallocated and never grows.
pub const FLAG_FIXED_SIZE: u32 = 1;
/// Header flag bit 1: a master-key rotation is in progress; the rekey
/// record (R_*) is valid (FORMAT.md §7).
pub const FLAG_REKEY: u32 = 2;

// Policy block, relative to H_POLICY. All zero = no policy set.
pub const P_MIN_PASSWORD_LEN: usize = 0; // u16
pub const P_PIN_POLICY: usize = 2; // u8
pub const P_RESERVED_1: usize = 3; // u8, zero
pub const P_ARGON_MIN_MEMORY_KIB: usize = 4; // u32
pub const P_ARGON_MIN_ITERATIONS: usize = 8; // u32
pub const P_ARGON_MIN_PARALLELISM: usize = 12; // u32
pub const P_IDLE_TIMEOUT_S: usize = 16; // u32
pub const P_RESERVED_2: std::ops::Range<usize> = 20..32; // zero
pub const POLICY_LEN: usize = 32;

// --------------------------------------------------------------- slots ----

pub const SLOT_COUNT: usize = 8;
pub const SLOT_SIZE: usize = 1024;

pub const S_KIND: usize = 0; // u8: 0 empty, 1 token + password, 2 recovery
pub const S_FLAGS: usize = 1; // u8: bit 0 = password must be changed
pub const S_RESERVED_1: std::ops::Range<usize> = 2..4; // zero
pub const S_SERIAL: usize = 4; // u32
pub const S_PIV_SLOT: usize = 8; // u8
pub const S_RESERVED_2: std::ops::Range<usize> = 9..16; // zero
pub const S_CARD_PUBLIC: usize = 16; // 65, SEC1 uncompressed
pub const S_EPHEMERAL_PUBLIC: usize = 81; // 65, SEC1 uncompressed
pub const S_RESERVED_3: std::ops::Range<usize> = 146..148; // zero
pub const S_SALT: usize = 148; // 32
pub const S_ARGON: usize = 180; // m KiB u32, t u32, p u32
pub const S_CREATED: usize = 192; // u64 Unix seconds
pub const S_LABEL: usize = 200; // 64, UTF-8, zero-padded
/// End of the slot metadata the slot AEAD authenticates (bytes 0..264).
pub const S_METADATA_END: usize = 264;
pub const S_NONCE: usize = 264; // 12
pub const S_WRAPPED: usize = 276; // 48: ciphertext (32) ‖ tag (16)
pub const S_RESERVED_TAIL: usize = 324; // random, not authenticated by the slot

pub const PUBLIC_KEY_LEN: usize = 65;
pub const LABEL_LEN: usize = 64;
pub const WRAPPED_LEN: usize = 48;

pub const SLOT_KIND_EMPTY: u8 = 0;
pub const SLOT_KIND_TOKEN: u8 = 1;
pub const SLOT_KIND_RECOVERY: u8 = 2;
pub const SLOT_FLAG_CHANGE_PASSWORD: u8 = 1;

/// PIV retired key slots usable for a vault key (82–95).
pub const PIV_RETIRED_SLOTS: std::ops::RangeInclusive<u8> = 0x82..=0x95;

// --------------------------------------------------------------- rekey ----
// FORMAT.md §7. The rekey record lies at the start of the header's reserved
// tail and means something only while FLAG_REKEY is set (otherwise random).

pub const H_REKEY: usize = H_RESERVED_TAIL; // 8320
pub const R_WATERMARK: usize = 0; // u64: sectors below are under the new key
pub const R_BATCH: usize = 8; // u64: sectors of the batch in flight from the watermark
pub const R_JOURNAL_HASH: usize = 16; // 32: SHA-256 of the batch's journal
pub const R_NEW_SEALS: usize = 48; // u64: seals reserved under the new key
pub const R_NONCE: usize = 56; // 12
pub const R_WRAPPED: usize = 68; // 48: new master key under the link key
pub const R_RESERVED: std::ops::Range<usize> = 116..128; // zero
pub const REKEY_RECORD_LEN: usize = 128;

// A slot awaiting activation keeps its old wrapping (bytes 0..324) and
// carries a link in its unauthenticated tail (the header MAC covers it).
pub const S_LINK_EPHEMERAL: usize = 324; // 65, SEC1 uncompressed
pub const S_LINK_NONCE: usize = 389; // 12
pub const S_LINK_WRAPPED: usize = 401; // 48: new master key under the link KEK
pub const S_LINK_END: usize = 449;

/// Most sectors re-encrypted per batch (one journal write, one header write).
pub const REKEY_MAX_BATCH: u64 = 1024;

/// HKDF info of the link key K_link = HKDF(old MK, id, label ‖ new epoch).
pub const REKEY_LINK_LABEL: &[u8] = b"keybound v1 rekey link";
/// AAD prefix of the new master key sealed in the rekey record.
pub const REKEY_RECORD_LABEL: &[u8] = b"keybound v1 rekey record";
/// HKDF info prefix / AAD prefix of a pending slot's link.
pub const SLOT_LINK_LABEL: &[u8] = b"keybound v1 slot link";

// ------------------------------------------------------ labels and AAD ----

/// AAD prefix of a key slot's AEAD.
pub const SLOT_AAD_LABEL: &[u8] = b"keybound v1 slot";

/// AAD prefix of a sector's AEAD.
pub const SECTOR_AAD_LABEL: &[u8] = b"keybound v1 sector";

/// Length of a sector's AAD: label ‖ container id ‖ key epoch (u32) ‖ n (u64).
pub const SECTOR_AAD_LEN: usize = SECTOR_AAD_LABEL.len() + CONTAINER_ID_LEN + 4 + 8;

// ------------------------------------------------------------- sectors ----

/// Bytes at the end of redb page 0's plaintext that hold the shadow pair's
/// generation. redb never writes there (its header is 320 bytes).
pub const PAGE0_GENERATION_OFFSET: usize = SECTOR_SIZE - 8;

/// Steps in which the seal budget is reserved in the header.
pub const SEAL_RESERVE_STEP: u64 = 1 << 20;

/// The most sectors one key epoch may ever seal: NIST's 2^32 random-nonce
/// invocations, less one reserve step of headroom.
pub const SEAL_LIMIT: u64 = crate::crypto::RANDOM_NONCE_SEAL_LIMIT - SEAL_RESERVE_STEP;

/// Largest logical store length accepted (1 PiB): far beyond any real vault,
/// small enough that no offset arithmetic can overflow.
pub const MAX_STORE_LEN: u64 = 1 << 50;

/// Store pages of the fsync log a new vault gets (1 MiB): store pages
/// `1..=FSYNC_LOG_PAGES`, between redb's page 0 and its page 1 (FORMAT.md §4.9).
pub const FSYNC_LOG_PAGES: u64 = 256;

/// A fixed-size container smaller than this (in sectors) gets no fsync log:
/// the log would take a large share of it.
pub const MIN_SECTORS_FOR_FSYNC_LOG: u64 = 16 * FSYNC_LOG_PAGES;

/// Largest sector count: enough sectors for [`MAX_STORE_LEN`].
pub const MAX_SECTORS: u64 = MAX_STORE_LEN / SECTOR_SIZE as u64 + 2;

/// Smallest fixed-size container, in sectors (a bit over 1 MiB of store):
/// room for redb's initial layout and a little data.
pub const MIN_FIXED_SECTORS: u64 = 257;

/// Physical sectors a store of `len` logical bytes occupies: redb page 0 is a
/// shadow pair (sectors 0 and 1), page k > 0 is sector k + 1.
pub fn sectors_for_len(len: u64) -> u64 {
    if len == 0 {
        0
    } else {
        len.div_ceil(SECTOR_SIZE as u64) + 1
    }
}

/// File offset of sealed sector `n`.
pub fn sector_offset(n: u64) -> u64 {
    DATA_OFFSET + n * SEALED_SECTOR_SIZE as u64
}

/// File length of a container whose data area holds `sectors` sectors.
pub fn file_len_for_sectors(sectors: u64) -> u64 {
    sector_offset(sectors)
}

const _: () = {
    assert!(H_RESERVED_TAIL == 8320);
    assert!(H_POLICY + POLICY_LEN == H_SLOTS);
    assert!(H_MAC + 32 == H_RESERVED_3.start);
    assert!(H_CHECKSUM + 32 == HEADER_COPY_SIZE);
    assert!(S_WRAPPED + WRAPPED_LEN == S_RESERVED_TAIL);
    assert!(S_LABEL + LABEL_LEN == S_METADATA_END);
    assert!(S_EPHEMERAL_PUBLIC + PUBLIC_KEY_LEN == S_RESERVED_3.start);
    assert!(SEALED_SECTOR_SIZE == 4124);
    assert!(SECTOR_AAD_LEN == 46);
    assert!(RESERVED_AREA_OFFSET <= DATA_OFFSET);
    assert!(R_WRAPPED + WRAPPED_LEN == R_RESERVED.start);
    assert!(H_REKEY + REKEY_RECORD_LEN <= H_MAC);
    assert!(H_REKEY + REKEY_RECORD_LEN <= H_SEGMENTS);
    assert!(H_SEGMENTS == 14224);
    assert!(SEGMENT_SECTORS.is_multiple_of(256));
    assert!(S_LINK_EPHEMERAL == S_RESERVED_TAIL);
    assert!(S_LINK_WRAPPED + WRAPPED_LEN == S_LINK_END);
    assert!(S_LINK_END <= SLOT_SIZE);
};
