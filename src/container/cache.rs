//! A bounded LRU cache of plaintext sectors, in locked memory.
//!
//! redb runs with a tiny page cache of its own, so this cache is what makes
//! repeated reads of btree pages and sequential reads of big values cheap.
//! It holds plaintext, so it lives where secrets live: slabs of
//! [`SecretBytes`] (locked, never swapped or dumped), each entry wiped when it
//! is evicted or removed and every slab wiped when the cache is dropped.
//!
//! Slabs are allocated as the cache fills. If the system refuses to lock
//! more memory (RLIMIT_MEMLOCK), the cache stops growing and keeps working
//! with what it has: a smaller cache is slower, never wrong.

use std::collections::HashMap;

use zeroize::Zeroize;

use super::layout::SECTOR_SIZE;
use crate::secrets::SecretBytes;

/// Sectors per slab: 1 MiB of locked memory per allocation.
const SLAB_SECTORS: usize = 256;

const NIL: u32 = u32::MAX;

struct Node {
    page: u64,
    prev: u32,
    next: u32,
}

pub(crate) struct SectorCache {
    slabs: Vec<SecretBytes>,
    /// Sectors per slab: [`SLAB_SECTORS`], or fewer for a smaller cache.
    slab_sectors: usize,
    max_entries: usize,
    map: HashMap<u64, u32>,
    /// One node per allocated entry slot, linked most- to least-recent.
    nodes: Vec<Node>,
    head: u32,
    tail: u32,
    free: Vec<u32>,
    /// Set when locking a new slab failed; the cache then stays its size.
    growth_failed: bool,
}

impl SectorCache {
    /// A cache of at most `max_bytes` of plaintext (rounded down to sectors).
    pub fn new(max_bytes: usize) -> Self {
        let max_entries = max_bytes / SECTOR_SIZE;
        SectorCache {
            slabs: Vec::new(),
            slab_sectors: SLAB_SECTORS.min(max_entries).max(1),
            max_entries,
            map: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            free: Vec::new(),
            growth_failed: false,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let slot = slot as usize;
        let slab = &mut self.slabs[slot / self.slab_sectors];
        let at = (slot % self.slab_sectors) * SECTOR_SIZE;
        &mut slab.as_mut()[at..at + SECTOR_SIZE]
    }

    fn slot(&self, slot: u32) -> &[u8] {
        let slot = slot as usize;
        let at = (slot % self.slab_sectors) * SECTOR_SIZE;
        &self.slabs[slot / self.slab_sectors].expose()[at..at + SECTOR_SIZE]
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let n = &self.nodes[slot as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[slot as usize];
            n.prev = NIL;
            n.next = old;
        }
        match old {
            NIL => self.tail = slot,
            o => self.nodes[o as usize].prev = slot,
        }
        self.head = slot;
    }

    /// Copy the cached plaintext of `page` into `out` (one sector), marking
    /// it most recently used. False if it is not cached.
    pub fn get(&mut self, page: u64, out: &mut [u8]) -> bool {
        let Some(&slot) = self.map.get(&page) else {
            return false;
        };
        self.unlink(slot);
        self.push_front(slot);
        out.copy_from_slice(self.slot(slot));
        true
    }

    /// A slot for a new entry: a free one, a new slab's, or the LRU victim's.
    fn take_slot(&mut self) -> Option<u32> {
        if self.map.len() < self.max_entries
            && let Some(slot) = self.free.pop()
        {
            return Some(slot);
        }
        let allocated = self.slabs.len() * self.slab_sectors;
        if allocated < self.max_entries && !self.growth_failed {
            match SecretBytes::zeroed(self.slab_sectors * SECTOR_SIZE) {
                Ok(slab) => {
                    self.slabs.push(slab);
                    let new = allocated as u32..(allocated + self.slab_sectors) as u32;
                    self.free.extend(new.rev());
                    return self.free.pop();
                }
                Err(e) => {
                    tracing::warn!(
                        cached_bytes = allocated * SECTOR_SIZE,
                        "sector cache stays at its size: {e}"
                    );
                    self.growth_failed = true;
                }
            }
        }
        let victim = self.tail;
        if victim == NIL {
            return None;
        }
        self.evict(victim);
        self.free.pop()
    }

    /// Remove the entry in `slot`, wipe it and free the slot.
    fn evict(&mut self, slot: u32) {
        self.unlink(slot);
        let page = self.nodes[slot as usize].page;
        self.map.remove(&page);
        self.slot_mut(slot).zeroize();
        self.free.push(slot);
    }

    /// Cache `data` (one sector of plaintext) as `page`.
    pub fn insert(&mut self, page: u64, data: &[u8]) {
        debug_assert_eq!(data.len(), SECTOR_SIZE);
        if let Some(&slot) = self.map.get(&page) {
            self.slot_mut(slot).copy_from_slice(data);
            self.unlink(slot);
            self.push_front(slot);
            return;
        }
        if self.max_entries == 0 {
            return;
        }
        let Some(slot) = self.take_slot() else {
            return;
        };
        self.slot_mut(slot).copy_from_slice(data);
        let node = Node {
            page,
            prev: NIL,
            next: NIL,
        };
        if self.nodes.len() <= slot as usize {
            self.nodes.resize_with(slot as usize + 1, || Node {
                page: 0,
                prev: NIL,
                next: NIL,
            });
        }
        self.nodes[slot as usize] = node;
        self.map.insert(page, slot);
        self.push_front(slot);
    }

    pub fn remove(&mut self, page: u64) {
        if let Some(&slot) = self.map.get(&page) {
            self.evict(slot);
        }
    }

    /// Drop every entry for pages `>= first`.
    pub fn remove_from(&mut self, first: u64) {
        let stale: Vec<u32> = self
            .map
            .iter()
            .filter(|&(&page, _)| page >= first)
            .map(|(_, &slot)| slot)
            .collect();
        for slot in stale {
            self.evict(slot);
        }
    }
}

impl std::fmt::Debug for SectorCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SectorCache({} of {} sectors)",
            self.map.len(),
            self.max_entries
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; SECTOR_SIZE]
    }

    #[test]
    fn lru_evicts_least_recent_and_stays_bounded() {
        let mut c = SectorCache::new(3 * SECTOR_SIZE);
        let mut out = page(0);
        for p in 0..3u64 {
            c.insert(p, &page(p as u8 + 1));
        }
        assert!(c.get(0, &mut out)); // 0 is now most recent
        c.insert(3, &page(4)); // evicts 1
        assert_eq!(c.len(), 3);
        assert!(!c.get(1, &mut out));
        assert!(c.get(0, &mut out) && out == page(1));
        assert!(c.get(2, &mut out) && out == page(3));
        assert!(c.get(3, &mut out) && out == page(4));
        c.insert(3, &page(9)); // update in place
        assert!(c.get(3, &mut out) && out == page(9));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn removal_frees_and_wipes() {
        let mut c = SectorCache::new(1 << 20);
        for p in 0..100u64 {
            c.insert(p, &page(p as u8));
        }
        c.remove(5);
        c.remove_from(50);
        assert_eq!(c.len(), 49);
        let mut out = page(0);
        assert!(!c.get(5, &mut out));
        assert!(!c.get(77, &mut out));
        assert!(c.get(49, &mut out) && out == page(49));
        // Freed slots are wiped.
        for &slot in &c.free {
            assert!(c.slot(slot).iter().all(|&b| b == 0));
        }
        // Churn through many more pages than fit: no growth beyond the cap.
        for p in 1000..5000u64 {
            c.insert(p, &page(1));
        }
        assert_eq!(c.len(), 256);
        assert_eq!(c.slabs.len(), 1);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = SectorCache::new(0);
        c.insert(1, &page(1));
        let mut out = page(0);
        assert!(!c.get(1, &mut out));
    }
}
