//! Randomness from the operating system (`getrandom`), through `ring`.
//!
//! No user-space generator sits in between: keys, salts and nonces are rare
//! enough that the syscall's cost does not matter, and there is no generator
//! state that could be duplicated by a `fork` and hand two processes the same
//! nonces.

use ring::rand::{SecureRandom, SystemRandom};

use super::CryptoError;
use crate::secrets::SecretBytes;

/// Fill `out` with random bytes.
pub(crate) fn fill(out: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| CryptoError::Random)
}

/// A random array, for public values (salts, nonces, ids).
pub(crate) fn array<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    fill(&mut out)?;
    Ok(out)
}

/// A random secret, generated directly in locked memory so it never exists
/// anywhere else.
pub(crate) fn secret(len: usize) -> Result<SecretBytes, CryptoError> {
    let mut out = SecretBytes::zeroed(len)?;
    fill(out.as_mut())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successive_values_differ() {
        // 2^-256 chance of a false failure.
        assert_ne!(array::<32>().unwrap(), array::<32>().unwrap());
        let a = secret(32).unwrap();
        let b = secret(32).unwrap();
        assert!(!a.ct_eq(b.expose()));
        assert_ne!(a.expose(), [0u8; 32]);
    }
}
