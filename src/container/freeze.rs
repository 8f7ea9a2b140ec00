//! Holding the container file still while a backup copies it.
//!
//! Every change the sector store makes to the file (a write, a length change,
//! a sync, closing) passes through the gate. A freeze closes the gate for new
//! changes and waits for the ones under way to finish: from then on the file
//! is exactly what a crash at that moment would leave, which the store and redb
//! are built to open (two-phase commit, the page-0 shadow pair), and it stays
//! that way until the thaw. Reads go on; writers wait.
//!
//! A freeze can be broken: the vault must still lock within a second when its
//! token leaves, and locking commits, which writes. A broken freeze opens the
//! gate for good and says so to whoever holds it, so the backup knows its copy
//! may be torn.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Default)]
struct State {
    /// Changes under way.
    writers: usize,
    /// The number of the freeze in force, if any.
    frozen: Option<u64>,
    /// Freezes handed out so far.
    freezes: u64,
    /// Set once the freeze was broken: the gate never closes again.
    broken: bool,
}

/// The gate between the sector store and its file.
#[derive(Debug, Default)]
pub struct FreezeGate {
    state: Mutex<State>,
    changed: Condvar,
}

/// What holding a freeze found when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thawed {
    /// Nothing touched the file while the freeze was held.
    Intact,
    /// The freeze was broken (the vault locked) before the thaw: the file may
    /// have changed during the copy.
    Broken,
}

/// Why a freeze could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FreezeError {
    #[error("another backup holds the vault still; wait for it to finish")]
    AlreadyFrozen,
    #[error("the vault is locking")]
    Locking,
}

/// A change to the file under way; the gate waits for it before a freeze.
#[must_use]
pub struct Change<'a> {
    gate: &'a FreezeGate,
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.writers -= 1;
        // Only a freeze waits for the changes under way to end, and it sets
        // `frozen` (under the lock) before it waits: without one there is
        // nobody to wake, and a wake is a syscall on every store call.
        let wake = s.writers == 0 && s.frozen.is_some();
        drop(s);
        if wake {
            self.gate.changed.notify_all();
        }
    }
}

impl FreezeGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few counters, consistent at every unlock: a panic
        // elsewhere leaves nothing half-done here.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait while frozen, then let one change to the file through.
    pub fn change(&self) -> Change<'_> {
        let mut s = self.lock();
        while s.frozen.is_some() {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.writers += 1;
        Change { gate: self }
    }

    /// Close the gate and wait until no change is under way. Returns the
    /// freeze's number, to hand back to [`FreezeGate::thaw`].
    pub fn freeze(&self) -> Result<u64, FreezeError> {
        let mut s = self.lock();
        if s.broken {
            return Err(FreezeError::Locking);
        }
        if s.frozen.is_some() {
            return Err(FreezeError::AlreadyFrozen);
        }
        s.freezes += 1;
        let id = s.freezes;
        s.frozen = Some(id);
        while s.writers > 0 && s.frozen == Some(id) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.frozen != Some(id) {
            // Broken while we waited.
            return Err(FreezeError::Locking);
        }
        Ok(id)
    }

    /// Open the gate again after freeze `id`; says whether it held throughout.
    pub fn thaw(&self, id: u64) -> Thawed {
        let mut s = self.lock();
        let held = s.frozen == Some(id) && !s.broken;
        if s.frozen == Some(id) {
            s.frozen = None;
        }
        drop(s);
        self.changed.notify_all();
        if held { Thawed::Intact } else { Thawed::Broken }
    }

    /// Open the gate for good, whoever holds it: the vault is locking.
    pub fn break_freeze(&self) {
        let mut s = self.lock();
        s.broken = true;
        let was = s.frozen.take();
        drop(s);
        self.changed.notify_all();
        if let Some(id) = was {
            tracing::warn!(freeze = id, "the vault is locking: backup hold broken");
        }
    }

    /// Whether a freeze is in force (the commit timer then waits rather than
    /// block on the gate holding the filesystem).
    pub fn is_frozen(&self) -> bool {
        self.lock().frozen.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn freeze_waits_for_changes_under_way_and_blocks_new_ones() {
        let gate = Arc::new(FreezeGate::default());
        let change = gate.change();
        let frozen = Arc::new(AtomicBool::new(false));
        let (g, f) = (gate.clone(), frozen.clone());
        let freezer = std::thread::spawn(move || {
            let id = g.freeze().unwrap();
            f.store(true, Ordering::SeqCst);
            id
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !frozen.load(Ordering::SeqCst),
            "froze over a change under way"
        );
        drop(change);
        let id = freezer.join().unwrap();
        assert!(gate.is_frozen());

        let wrote = Arc::new(AtomicBool::new(false));
        let (g, w) = (gate.clone(), wrote.clone());
        let writer = std::thread::spawn(move || {
            let _c = g.change();
            w.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !wrote.load(Ordering::SeqCst),
            "a change got through a freeze"
        );
        assert_eq!(gate.freeze(), Err(FreezeError::AlreadyFrozen));
        assert_eq!(gate.thaw(id), Thawed::Intact);
        writer.join().unwrap();
        assert!(wrote.load(Ordering::SeqCst));
    }

    #[test]
    fn breaking_lets_writers_through_and_tells_the_holder() {
        let gate = Arc::new(FreezeGate::default());
        let id = gate.freeze().unwrap();
        let g = gate.clone();
        let writer = std::thread::spawn(move || drop(g.change()));
        gate.break_freeze();
        writer.join().unwrap();
        assert_eq!(gate.thaw(id), Thawed::Broken);
        assert_eq!(gate.freeze(), Err(FreezeError::Locking));
        drop(gate.change());
    }
}
