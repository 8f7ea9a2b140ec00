//! Password hashing (Argon2id) and key-encryption keys (HKDF-SHA256).
//!
//! A token key slot's KEK is
//!
//! ```text
//! KEK = HKDF-SHA256(ikm  = ECDH secret from the card ‖ Argon2id(password, salt),
//!                   salt = the slot's salt,
//!                   info = slot_info(container id, slot index))
//! ```
//!
//! Either half alone is useless: without the card's ECDH secret, guessing the
//! password offline gets nowhere; without the password, the card (even with
//! its PIN) does not open the slot. Argon2id makes each password guess cost
//! memory and time for whoever does have the card. A recovery slot's KEK is
//! HKDF over the 256-bit recovery key alone: it is random, so stretching it
//! would add nothing.

use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Block, Version};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::hkdf::hkdf_sha256;
use super::keys::{CONTAINER_ID_LEN, KEY_LEN};
use super::{CryptoError, check_len, random};
use crate::secrets::SecretBytes;

/// Length of a key slot's salt (used both by Argon2id and by the KEK's HKDF).
pub const SALT_LEN: usize = 32;

/// Length of the ECDH shared secret (a P-256 x-coordinate).
pub const ECDH_SECRET_LEN: usize = 32;

/// Length of Argon2id's output, of every KEK and of a recovery key.
pub const PASSWORD_HASH_LEN: usize = 32;

/// HKDF info label for key slots. Part of the on-disk format.
const SLOT_LABEL: &[u8] = b"keybound v1 key slot";

/// Argon2id cost parameters, stored in each key slot and calibrated when the
/// slot is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Params {
    /// Memory per derivation, in KiB.
    pub memory_kib: u32,
    /// Passes over that memory.
    pub iterations: u32,
    /// Lanes. They are computed in parallel, one thread per lane up to the
    /// number of cores, so on a machine with several cores more lanes make
    /// our own derivation faster while an attacker's total work (memory ×
    /// passes) stays the same.
    pub parallelism: u32,
}

impl Argon2Params {
    /// What a new slot gets unless told otherwise: RFC 9106's second
    /// recommended option (section 4), exactly: 64 MiB, 3 passes, 4 lanes.
    ///
    /// RFC 9106 calls it uniformly safe where memory is constrained. It costs
    /// an attacker at least what gocryptfs's default scrypt (N = 2^16, r = 8:
    /// the same 64 MiB, two passes) costs, per guess, and here the password
    /// is the second line: every guess also needs the card's ECDH secret (see
    /// docs/threat-model.md). The 4 lanes run in parallel, so on two cores a
    /// derivation takes ~45 ms here instead of ~90 ms with one lane.
    /// `create --kdf-time` calibrates more passes for whoever wants them.
    pub const RECOMMENDED: Argon2Params = Argon2Params {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 4,
    };

    /// The floor: 64 MiB, 3 passes, 1 lane.
    ///
    /// [`Self::RECOMMENDED`] with any number of lanes: lanes change how fast
    /// we derive, not an attacker's total work (memory × passes), and slots
    /// made before lanes ran in parallel have one. The floor is what we
    /// accept from any slot, including slots a faster machine calibrated. It
    /// is deliberately not higher: Argon2id is the second line here (the
    /// card's ECDH secret is the first), and a 64 MiB floor keeps vaults
    /// openable on small machines.
    pub const MIN: Argon2Params = Argon2Params {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };

    /// The ceiling: parameters above it are refused, not attempted. A slot
    /// asking for more is corrupt or hostile (a crafted header could otherwise
    /// make unlocking exhaust memory or run for hours). 4 GiB is already more
    /// than a laptop should spend; 256 passes leave room for a fast machine
    /// calibrating to several seconds at 64 MiB (27 passes take 1 s here).
    pub const MAX: Argon2Params = Argon2Params {
        memory_kib: 4 * 1024 * 1024,
        iterations: 256,
        parallelism: 16,
    };

    /// Refuse parameters below [`Self::MIN`] or above [`Self::MAX`], naming
    /// the field.
    pub fn validate(&self) -> Result<(), CryptoError> {
        let fields = [
            (
                "memory_kib",
                self.memory_kib,
                Self::MIN.memory_kib,
                Self::MAX.memory_kib,
            ),
            (
                "iterations",
                self.iterations,
                Self::MIN.iterations,
                Self::MAX.iterations,
            ),
            (
                "parallelism",
                self.parallelism,
                Self::MIN.parallelism,
                Self::MAX.parallelism,
            ),
        ];
        for (field, value, min, max) in fields {
            let problem = if value < min {
                format!("below the minimum of {min}")
            } else if value > max {
                format!("above the maximum of {max}")
            } else {
                continue;
            };
            return Err(CryptoError::Argon2Params {
                field,
                value,
                problem,
            });
        }
        Ok(())
    }

    fn context(&self) -> Result<Argon2<'static>, CryptoError> {
        let params = argon2::Params::new(
            self.memory_kib,
            self.iterations,
            self.parallelism,
            Some(PASSWORD_HASH_LEN),
        )
        .map_err(|e| CryptoError::Argon2(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Run Argon2 into `out` with working memory we own, so we can wipe it.
///
/// The last blocks of that memory determine the output, so leaving them in
/// freed heap would leave the password hash behind. The memory is too large
/// to lock (it would exceed RLIMIT_MEMLOCK), so it is wiped as soon as the
/// hash is done instead. `out` is the caller's (a `SecretBytes`), so the hash
/// itself never touches ordinary memory; with the crate's `zeroize` feature,
/// its internal seed and final block are wiped as well, and the blocks it
/// works on in its stack frames are scrubbed afterwards.
///
/// The memory is reserved fallibly: in a mount daemon whose memory is locked
/// (`secrets::lock_all_memory`), a too-low locked-memory limit is an error
/// here, not an abort.
fn hash_into(
    ctx: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    let count = ctx.params().block_count();
    let mut blocks = Vec::new();
    blocks.try_reserve_exact(count).map_err(|_| {
        CryptoError::Argon2(format!(
            "cannot allocate {} MiB of working memory (is the locked-memory limit, \
             `ulimit -l`, too low?)",
            (count * std::mem::size_of::<Block>()) >> 20
        ))
    })?;
    blocks.resize(count, Block::default());
    let result = on_lane_threads(ctx.params().p_cost(), || {
        hash_inner(ctx, password, salt, out, &mut blocks)
    });
    blocks.zeroize();
    crate::secrets::scrub_stack();
    result
}

/// Run `derive` on a pool of threads of its own, one per lane up to the
/// number of cores, so the `argon2` crate computes the lanes in parallel;
/// then scrub the stacks of those threads and let them go.
///
/// A pool of our own, not rayon's global one, because the workers' stacks
/// hold Argon2's working blocks afterwards (the last blocks of each lane
/// determine the hash): they are scrubbed while we still know the threads,
/// and no idle worker stays behind for the rest of a mount. Even one lane
/// needs the pool: outside one, the crate hands its lanes to rayon's global
/// pool, whose threads we could not scrub. Starting the threads costs well
/// under a millisecond.
fn on_lane_threads(
    lanes: u32,
    derive: impl FnOnce() -> argon2::Result<()> + Send,
) -> Result<(), CryptoError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (lanes as usize).clamp(1, cores);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("argon2-lane-{i}"))
        .build()
        .map_err(|e| CryptoError::Argon2(format!("cannot start the lane threads: {e}")))?;
    let result = pool.install(derive);
    pool.broadcast(|_| crate::secrets::scrub_stack());
    result.map_err(|e| CryptoError::Argon2(e.to_string()))
}

#[inline(never)]
fn hash_inner(
    ctx: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
    blocks: &mut [Block],
) -> argon2::Result<()> {
    ctx.hash_password_into_with_memory(password, salt, out, blocks)
}

/// Argon2id(password, salt) with `params`, a 32-byte hash in locked memory.
/// Refuses parameters outside [`Argon2Params::MIN`]..=[`Argon2Params::MAX`].
pub fn argon2id(
    password: &SecretBytes,
    salt: &[u8; SALT_LEN],
    params: Argon2Params,
) -> Result<SecretBytes, CryptoError> {
    params.validate()?;
    let mut out = SecretBytes::zeroed(PASSWORD_HASH_LEN)?;
    hash_into(&params.context()?, password.expose(), salt, out.as_mut())?;
    Ok(out)
}

/// The Argon2id parameters for a new key slot with `memory_kib` of memory:
/// [`Argon2Params::RECOMMENDED`]'s passes and lanes, or, given a `target`
/// time, as many passes as take that long on this machine (see
/// [`calibrate`]).
pub fn new_slot_params(
    target: Option<Duration>,
    memory_kib: u32,
) -> Result<Argon2Params, CryptoError> {
    match target {
        Some(target) => calibrate(target, memory_kib),
        None => {
            let params = Argon2Params {
                memory_kib,
                ..Argon2Params::RECOMMENDED
            };
            params.validate()?;
            Ok(params)
        }
    }
}

/// Pick the number of passes that makes one derivation with `memory_kib` take
/// about `target` on this machine (never fewer than [`Argon2Params::MIN`]'s,
/// never more than [`Argon2Params::MAX`]'s), with
/// [`Argon2Params::RECOMMENDED`]'s lanes.
///
/// A derivation costs a fixed part (allocating, first touching and wiping the
/// memory) plus a part per pass. One probe with a single pass gives a first
/// estimate; a second probe with enough passes to take about a quarter of
/// `target` gives the per-pass cost as a difference measured over many passes,
/// which keeps timing noise (page faults, a busy second core) from skewing it.
/// Calibrating costs about a quarter of `target` plus two single-pass runs.
pub fn calibrate(target: Duration, memory_kib: u32) -> Result<Argon2Params, CryptoError> {
    let mut params = Argon2Params {
        memory_kib,
        ..Argon2Params::RECOMMENDED
    };
    params.validate()?;
    let mut out = [0u8; PASSWORD_HASH_LEN];
    let mut probe = |iterations| -> Result<Duration, CryptoError> {
        let ctx = Argon2Params {
            iterations,
            ..params
        }
        .context()?;
        let start = Instant::now();
        hash_into(&ctx, b"calibration", &[0u8; SALT_LEN], &mut out)?;
        Ok(start.elapsed())
    };
    let one = probe(1)?;
    let extra = ((target / 4).as_secs_f64() / one.as_secs_f64()).clamp(1.0, 16.0) as u32;
    let many = probe(1 + extra)?;
    // Noise can make the long probe look barely slower than the short one;
    // then count the whole short probe as one pass, which errs towards fewer
    // passes (the floor still holds).
    let per_pass = match many.checked_sub(one) {
        Some(d) if d / extra >= one / 4 => d / extra,
        _ => one,
    };
    let fixed = one.saturating_sub(per_pass);
    let passes = target.saturating_sub(fixed).as_secs_f64() / per_pass.as_secs_f64();
    params.iterations =
        (passes.round() as u32).clamp(Argon2Params::MIN.iterations, Argon2Params::MAX.iterations);
    Ok(params)
}

/// The HKDF info for a key slot: a fixed label, the container id and the slot
/// index, so a KEK is bound to one slot of one vault. (The label has a fixed
/// length, so the concatenation is unambiguous.)
pub fn slot_info(container_id: &[u8; CONTAINER_ID_LEN], slot_index: u8) -> Vec<u8> {
    let mut info = Vec::with_capacity(SLOT_LABEL.len() + CONTAINER_ID_LEN + 1);
    info.extend_from_slice(SLOT_LABEL);
    info.extend_from_slice(container_id);
    info.push(slot_index);
    info
}

/// The KEK of a token slot: HKDF-SHA256 over `ecdh` ‖ `password_hash` (both
/// 32 bytes; the concatenation is built in locked memory), with the slot's
/// `salt` and `info` (see [`slot_info`]).
pub fn key_encryption_key(
    ecdh: &[u8],
    password_hash: &SecretBytes,
    salt: &[u8; SALT_LEN],
    info: &[u8],
) -> Result<SecretBytes, CryptoError> {
    check_len("an ECDH shared secret", ecdh.len(), ECDH_SECRET_LEN)?;
    check_len("a password hash", password_hash.len(), PASSWORD_HASH_LEN)?;
    let mut ikm = SecretBytes::zeroed(ECDH_SECRET_LEN + PASSWORD_HASH_LEN)?;
    let (left, right) = ikm.as_mut().split_at_mut(ECDH_SECRET_LEN);
    left.copy_from_slice(ecdh);
    right.copy_from_slice(password_hash.expose());
    let mut kek = SecretBytes::zeroed(KEY_LEN)?;
    hkdf_sha256(ikm.expose(), salt, info, kek.as_mut())?;
    Ok(kek)
}

/// The KEK of a recovery slot: HKDF-SHA256 over the 256-bit recovery key.
pub fn recovery_kek(
    recovery_key: &SecretBytes,
    salt: &[u8; SALT_LEN],
    info: &[u8],
) -> Result<SecretBytes, CryptoError> {
    check_len("a recovery key", recovery_key.len(), PASSWORD_HASH_LEN)?;
    let mut kek = SecretBytes::zeroed(KEY_LEN)?;
    hkdf_sha256(recovery_key.expose(), salt, info, kek.as_mut())?;
    Ok(kek)
}

/// A fresh random salt for a key slot.
pub fn random_salt() -> Result<[u8; SALT_LEN], CryptoError> {
    random::array()
}

/// A fresh 256-bit recovery key, generated in locked memory. Showing it to the
/// admin (once) is the CLI's job.
pub fn generate_recovery_key() -> Result<SecretBytes, CryptoError> {
    random::secret(PASSWORD_HASH_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9106, section 5.3: Argon2id with secret and associated data, run
    /// through the same `hash_into` as real derivations (its 4 lanes on
    /// parallel threads when there are several cores).
    #[test]
    fn rfc9106_argon2id_vector() {
        let params = argon2::ParamsBuilder::new()
            .m_cost(32)
            .t_cost(3)
            .p_cost(4)
            .data(argon2::AssociatedData::new(&[4u8; 12]).unwrap())
            .output_len(32)
            .build()
            .unwrap();
        let secret = [3u8; 8];
        let ctx =
            Argon2::new_with_secret(&secret, Algorithm::Argon2id, Version::V0x13, params).unwrap();
        let mut out = [0u8; 32];
        hash_into(&ctx, &[1u8; 32], &[2u8; 16], &mut out).unwrap();
        assert_eq!(
            hex::encode(out),
            "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"
        );
    }

    #[test]
    fn argon2id_uses_the_given_params_and_salt() {
        let password = SecretBytes::from_slice(b"correct horse battery staple").unwrap();
        let salt = [0x11u8; SALT_LEN];
        let params = Argon2Params::MIN;
        let hash = argon2id(&password, &salt, params).unwrap();
        assert_eq!(hash.len(), PASSWORD_HASH_LEN);

        // Same as the crate computes for m, t, p in that order (catches
        // swapped fields), and different for another salt.
        // (In a pool of its own: rayon's global one must stay unstarted, see
        // `derivations_leave_rayons_global_pool_unstarted`.)
        let reference = argon2::Params::new(64 * 1024, 3, 1, Some(32)).unwrap();
        let mut expected = [0u8; 32];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            Argon2::new(Algorithm::Argon2id, Version::V0x13, reference).hash_password_into(
                password.expose(),
                &salt,
                &mut expected,
            )
        })
        .unwrap();
        assert_eq!(hash.expose(), expected);

        let mut other_salt = salt;
        other_salt[0] ^= 1;
        let other = argon2id(&password, &other_salt, params).unwrap();
        assert_ne!(hash.expose(), other.expose());
    }

    #[test]
    fn params_outside_the_bounds_are_refused_by_name() {
        Argon2Params::MIN.validate().unwrap();
        Argon2Params::MAX.validate().unwrap();
        let cases = [
            (
                Argon2Params {
                    memory_kib: 64 * 1024 - 1,
                    ..Argon2Params::MIN
                },
                "memory_kib",
                "below",
            ),
            (
                Argon2Params {
                    iterations: 2,
                    ..Argon2Params::MIN
                },
                "iterations",
                "below",
            ),
            (
                Argon2Params {
                    parallelism: 0,
                    ..Argon2Params::MIN
                },
                "parallelism",
                "below",
            ),
            (
                Argon2Params {
                    memory_kib: u32::MAX,
                    ..Argon2Params::MIN
                },
                "memory_kib",
                "above",
            ),
            (
                Argon2Params {
                    iterations: 1_000_000,
                    ..Argon2Params::MIN
                },
                "iterations",
                "above",
            ),
            (
                Argon2Params {
                    parallelism: 255,
                    ..Argon2Params::MIN
                },
                "parallelism",
                "above",
            ),
        ];
        for (params, field, side) in cases {
            let err = params.validate().unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(side), "{err}");
            // argon2id refuses them before doing any work.
            let password = SecretBytes::from_slice(b"pw").unwrap();
            assert!(matches!(
                argon2id(&password, &[0; SALT_LEN], params),
                Err(CryptoError::Argon2Params { .. })
            ));
        }
    }

    #[test]
    fn params_round_trip_through_serde() {
        let params = Argon2Params {
            memory_kib: 262_144,
            iterations: 7,
            parallelism: 1,
        };
        let json = serde_json::to_string(&params).unwrap();
        assert_eq!(
            json,
            r#"{"memory_kib":262144,"iterations":7,"parallelism":1}"#
        );
        assert_eq!(serde_json::from_str::<Argon2Params>(&json).unwrap(), params);
        assert!(serde_json::from_str::<Argon2Params>(r#"{"memory_kib":1}"#).is_err());
    }

    #[test]
    fn calibration_never_goes_below_the_floor() {
        let params = calibrate(Duration::from_millis(50), Argon2Params::MIN.memory_kib).unwrap();
        params.validate().unwrap();
        assert_eq!(params.memory_kib, Argon2Params::MIN.memory_kib);
        assert_eq!(params.parallelism, Argon2Params::RECOMMENDED.parallelism);
        assert!(params.iterations >= Argon2Params::MIN.iterations);
        assert!(calibrate(Duration::from_secs(1), 1024).is_err());
    }

    #[test]
    fn a_new_slot_gets_rfc9106s_recommendation_unless_given_a_time() {
        let recommended = new_slot_params(None, 64 * 1024).unwrap();
        assert_eq!(recommended, Argon2Params::RECOMMENDED);
        assert_eq!(
            (
                recommended.memory_kib,
                recommended.iterations,
                recommended.parallelism
            ),
            (64 * 1024, 3, 4),
            "RFC 9106, section 4, second recommended option"
        );
        let more_memory = new_slot_params(None, 256 * 1024).unwrap();
        assert_eq!(more_memory.memory_kib, 256 * 1024);
        assert_eq!(more_memory.iterations, 3);
        assert!(new_slot_params(None, 1024).is_err(), "below the floor");

        let calibrated = new_slot_params(Some(Duration::from_millis(200)), 64 * 1024).unwrap();
        assert_eq!(calibrated.parallelism, 4);
        assert!(calibrated.iterations >= 3);
    }

    /// Derivations run on threads of their own, one lane or four, never on
    /// rayon's global pool, whose workers would keep Argon2's blocks on their
    /// stacks, unscrubbed, for the rest of the process.
    #[test]
    fn derivations_leave_rayons_global_pool_unstarted() {
        let password = SecretBytes::from_slice(b"lanes").unwrap();
        for params in [Argon2Params::MIN, Argon2Params::RECOMMENDED] {
            argon2id(&password, &[7u8; SALT_LEN], params).unwrap();
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global()
            .expect("the global pool was never started");
    }

    fn secret(byte: u8) -> SecretBytes {
        SecretBytes::from_slice(&[byte; 32]).unwrap()
    }

    #[test]
    fn kek_depends_on_every_input() {
        let ecdh = [1u8; 32];
        let pw = secret(2);
        let salt = [3u8; SALT_LEN];
        let info = slot_info(&[4u8; CONTAINER_ID_LEN], 0);
        let base = key_encryption_key(&ecdh, &pw, &salt, &info).unwrap();
        assert_eq!(
            base.expose(),
            key_encryption_key(&ecdh, &pw, &salt, &info)
                .unwrap()
                .expose()
        );

        let mut ecdh2 = ecdh;
        ecdh2[31] ^= 1;
        let mut salt2 = salt;
        salt2[0] ^= 1;
        let variants = [
            key_encryption_key(&ecdh2, &pw, &salt, &info).unwrap(),
            key_encryption_key(&ecdh, &secret(0x22), &salt, &info).unwrap(),
            key_encryption_key(&ecdh, &pw, &salt2, &info).unwrap(),
            key_encryption_key(&ecdh, &pw, &salt, &slot_info(&[4; 16], 1)).unwrap(),
            key_encryption_key(&ecdh, &pw, &salt, &slot_info(&[5; 16], 0)).unwrap(),
            // Swapping the halves must matter too: the order is fixed.
            key_encryption_key(&[2u8; 32], &secret(1), &salt, &info).unwrap(),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(v.expose(), base.expose(), "variant {i}");
        }
    }

    #[test]
    fn kek_is_hkdf_over_ecdh_then_password_hash() {
        let info = slot_info(&[4u8; CONTAINER_ID_LEN], 3);
        assert_eq!(&info[..SLOT_LABEL.len()], b"keybound v1 key slot");
        assert_eq!(info.len(), SLOT_LABEL.len() + 17);
        assert_eq!(info[info.len() - 1], 3);
        let kek = key_encryption_key(&[1u8; 32], &secret(2), &[3u8; SALT_LEN], &info).unwrap();
        let mut ikm = [1u8; 64];
        ikm[32..].fill(2);
        let mut expected = [0u8; 32];
        hkdf_sha256(&ikm, &[3u8; SALT_LEN], &info, &mut expected).unwrap();
        assert_eq!(kek.expose(), expected);
    }

    #[test]
    fn kek_inputs_must_have_the_right_length() {
        let pw = secret(2);
        assert!(matches!(
            key_encryption_key(&[0u8; 31], &pw, &[0; SALT_LEN], b""),
            Err(CryptoError::Length { .. })
        ));
        let short = SecretBytes::from_slice(&[0u8; 16]).unwrap();
        assert!(key_encryption_key(&[0u8; 32], &short, &[0; SALT_LEN], b"").is_err());
        assert!(recovery_kek(&short, &[0; SALT_LEN], b"").is_err());
    }

    #[test]
    fn recovery_kek_depends_on_key_salt_and_info() {
        let key = generate_recovery_key().unwrap();
        assert_eq!(key.len(), 32);
        let salt = random_salt().unwrap();
        let info = slot_info(&[9u8; 16], 7);
        let base = recovery_kek(&key, &salt, &info).unwrap();
        assert_eq!(
            base.expose(),
            recovery_kek(&key, &salt, &info).unwrap().expose()
        );
        let mut salt2 = salt;
        salt2[5] ^= 0x80;
        for other in [
            recovery_kek(&generate_recovery_key().unwrap(), &salt, &info).unwrap(),
            recovery_kek(&key, &salt2, &info).unwrap(),
            recovery_kek(&key, &salt, &slot_info(&[9u8; 16], 6)).unwrap(),
        ] {
            assert_ne!(other.expose(), base.expose());
        }
    }

    /// The pieces fit together: a master key sealed under a token KEK opens
    /// with the same password and ECDH secret and with nothing else.
    #[test]
    fn token_slot_round_trip() {
        use crate::crypto::aead;
        use crate::crypto::keys::MasterKey;

        let container_id = [0x42u8; CONTAINER_ID_LEN];
        let info = slot_info(&container_id, 0);
        let salt = random_salt().unwrap();
        let ecdh = [0x5au8; 32];
        // A stand-in for Argon2id's output (Argon2id itself is tested above).
        let pw_hash = secret(0x77);
        let master = MasterKey::generate().unwrap();
        let kek = key_encryption_key(&ecdh, &pw_hash, &salt, &info).unwrap();
        let nonce = aead::random_nonce().unwrap();
        let sealed = aead::seal(&kek, &nonce, b"slot metadata", master.expose()).unwrap();

        let again = key_encryption_key(&ecdh, &pw_hash, &salt, &info).unwrap();
        let opened = aead::open(&again, &nonce, b"slot metadata", &sealed).unwrap();
        let unwrapped = MasterKey::from_secret(opened).unwrap();
        assert_eq!(unwrapped.expose(), master.expose());

        let wrong = key_encryption_key(&ecdh, &secret(0x78), &salt, &info).unwrap();
        assert!(matches!(
            aead::open(&wrong, &nonce, b"slot metadata", &sealed),
            Err(CryptoError::Authentication)
        ));
    }
}
