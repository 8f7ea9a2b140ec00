//! `ring`'s key objects (AES key schedules, GHASH tables, HMAC pad states) are
//! plain inline data that `ring` never wipes. Each of them is as good as the key
//! it came from, and the sector cipher's lives as long as the vault is open, so
//! we move them into a [`SecretBytes`] mapping: locked in RAM, left out of core
//! dumps, zeroed when dropped.
//!
//! What this cannot cover: the value is built on the stack by `ring` and moved
//! in, so a copy of it may linger in a stack frame until that memory is reused.
//! `ring` offers no way to construct a key in place; the long-lived copy, the
//! one that matters at lock time, is the one we control.

use std::marker::PhantomData;
use std::ptr::NonNull;

use crate::secrets::{SecretBytes, SecretError};

/// A `T` stored in its own locked, non-dumpable mapping, wiped on drop.
///
/// Only for types whose secret state is inline (no heap pointers), such as
/// `ring::aead::LessSafeKey`, `ring::hmac::Key` and `ring::hkdf::Prk`:
/// heap memory a `T` points to would not be covered.
pub(crate) struct Locked<T> {
    /// Points into `_mem`; derived once with write access so the value can be
    /// both read and dropped in place. `_mem` is never accessed through its
    /// own accessors again, so this pointer stays the only way in.
    ptr: NonNull<T>,
    /// Held for its drop: after the value is dropped, it zeroes and unmaps.
    _mem: SecretBytes,
    _owns: PhantomData<T>,
}

// SAFETY: `Locked<T>` owns its `T` exclusively (the pointer targets memory owned
// by `mem`), so it may cross threads whenever `T` may.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub(crate) fn new(value: T) -> Result<Self, SecretError> {
        const {
            // A mapping is page-aligned, and pages are at least 4 KiB everywhere
            // we run, so any alignment up to that is satisfied.
            assert!(std::mem::size_of::<T>() > 0);
            assert!(std::mem::align_of::<T>() <= 4096);
        }
        let mut mem = SecretBytes::zeroed(std::mem::size_of::<T>())?;
        let raw = mem.as_mut().as_mut_ptr().cast::<T>();
        debug_assert!(raw.is_aligned());
        // SAFETY: `raw` is valid for writes of `size_of::<T>()` bytes, aligned
        // (checked above), and holds no value yet that would need dropping.
        unsafe { raw.write(value) };
        Ok(Locked {
            ptr: NonNull::new(raw).expect("a mapping is never at address 0"),
            _mem: mem,
            _owns: PhantomData,
        })
    }

    pub(crate) fn get(&self) -> &T {
        // SAFETY: `ptr` points to the initialised `T` written in `new`, which
        // lives until `drop`; `&self` ties the borrow to that lifetime.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: the value was initialised in `new` and is dropped exactly once,
        // here; afterwards `_mem` zeroes and unmaps the bytes it occupied.
        unsafe { self.ptr.as_ptr().drop_in_place() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn holds_the_value_and_drops_it_once() {
        let counter = Rc::new(());
        let locked = Locked::new((Rc::clone(&counter), 42u64)).unwrap();
        assert_eq!(locked.get().1, 42);
        assert_eq!(Rc::strong_count(&counter), 2);
        drop(locked);
        assert_eq!(Rc::strong_count(&counter), 1);
    }
}
