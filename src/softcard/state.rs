//! The card's persistent state and its JSON state file.
//!
//! TEST DEVICE, NOT SECURE: the PIN, PUK, management key and private keys are
//! stored unencrypted (hex) in the state file, which is only protected by its
//! 0600 mode.
//!
//! Every change is written atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory) before the card answers the APDU
//! that caused it, so a decremented PIN counter stays decremented even if the
//! process is killed right after answering.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use p256::SecretKey;
use rand::Rng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto;
use super::error::SoftcardError;

/// Factory PIN of a YubiKey.
pub const DEFAULT_PIN: &[u8] = b"123456";
/// Factory PUK of a YubiKey.
pub const DEFAULT_PUK: &[u8] = b"12345678";
/// Factory management key (3DES) of a YubiKey 5 before 5.7.
pub const DEFAULT_MGM_KEY: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];
/// Factory retry count of both PIN and PUK.
pub const DEFAULT_TRIES: u8 = 3;
/// The only asymmetric algorithm this card implements (PIV algorithm id).
pub const ALG_ECCP256: u8 = 0x11;

const FORMAT: u32 = 1;
const WARNING: &str =
    "keybound-softcard TEST DEVICE, NOT SECURE: every secret in this file is unencrypted";

/// When a key slot needs the PIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinPolicy {
    Never = 1,
    Once = 2,
    Always = 3,
}

/// When a key slot needs a touch (simulated: there is no button).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TouchPolicy {
    Never = 1,
    Always = 2,
    Cached = 3,
}

/// Where a slot's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Generated = 1,
    Imported = 2,
}

/// A PIN or PUK with its retry counter.
#[derive(Clone)]
pub struct Reference {
    pub value: Zeroizing<Vec<u8>>,
    pub tries_left: u8,
    pub tries_max: u8,
}

impl Reference {
    fn new(value: &[u8], tries: u8) -> Reference {
        Reference {
            value: Zeroizing::new(value.to_vec()),
            tries_left: tries,
            tries_max: tries,
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.tries_left == 0
    }

    pub fn matches(&self, candidate: &[u8]) -> bool {
        crypto::ct_eq(&self.value, candidate)
    }
}

/// A private key in a slot.
#[derive(Clone)]
pub struct SlotKey {
    pub secret: SecretKey,
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    pub origin: Origin,
}

/// Everything the card remembers across power cycles and restarts.
#[derive(Clone)]
pub struct CardState {
    pub serial: u32,
    pub pin: Reference,
    pub puk: Reference,
    pub mgm_key: Zeroizing<[u8; 24]>,
    /// Whether the management key requires touch (SET MANAGEMENT KEY P2 FE).
    pub mgm_touch: bool,
    /// Keys by slot number (9A, 9C, 9D, 9E, 82–95).
    pub keys: BTreeMap<u8, SlotKey>,
    /// GET/PUT DATA objects by tag, without the 53 wrapper.
    pub objects: BTreeMap<u32, Vec<u8>>,
}

impl CardState {
    /// A factory-fresh YubiKey 5 with this serial.
    pub fn factory(serial: u32) -> CardState {
        CardState {
            serial,
            pin: Reference::new(DEFAULT_PIN, DEFAULT_TRIES),
            puk: Reference::new(DEFAULT_PUK, DEFAULT_TRIES),
            mgm_key: Zeroizing::new(DEFAULT_MGM_KEY),
            mgm_touch: false,
            keys: BTreeMap::new(),
            objects: BTreeMap::new(),
        }
    }

    /// PIN and PUK back to factory values with these maxima (SET PIN RETRIES).
    pub fn reset_pin_puk(&mut self, pin_tries: u8, puk_tries: u8) {
        self.pin = Reference::new(DEFAULT_PIN, pin_tries);
        self.puk = Reference::new(DEFAULT_PUK, puk_tries);
    }
}

/// A random eight-digit serial, as a new card gets without `--serial`.
pub fn random_serial() -> u32 {
    rand::thread_rng().gen_range(10_000_000..100_000_000)
}

/// The card state and where it is persisted.
pub struct StateStore {
    path: Option<PathBuf>,
    state: CardState,
}

impl StateStore {
    /// Load the state file, or create a factory-fresh card there if it does
    /// not exist. A given `serial` must match the one in an existing file.
    pub fn open(path: &Path, serial: Option<u32>) -> Result<StateStore, SoftcardError> {
        let state = match fs::read(path) {
            Ok(bytes) => {
                let state = decode(&bytes).map_err(|reason| SoftcardError::StateCorrupt {
                    path: path.to_path_buf(),
                    reason,
                })?;
                check_serial(path, &state, serial)?;
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let state = CardState::factory(serial.unwrap_or_else(random_serial));
                save(path, &state)?;
                state
            }
            Err(source) => {
                return Err(SoftcardError::StateRead {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(StateStore {
            path: Some(path.to_path_buf()),
            state,
        })
    }

    /// A card that lives only in memory (unit tests, fuzzing).
    pub fn in_memory(state: CardState) -> StateStore {
        StateStore { path: None, state }
    }

    pub fn get(&self) -> &CardState {
        &self.state
    }

    /// Apply a change and persist it; memory is only updated once the file
    /// is safely written, so a failed write leaves the card as it was.
    pub fn update<R>(
        &mut self,
        change: impl FnOnce(&mut CardState) -> R,
    ) -> Result<R, SoftcardError> {
        let mut next = self.state.clone();
        let result = change(&mut next);
        if let Some(path) = &self.path {
            save(path, &next)?;
        }
        self.state = next;
        Ok(result)
    }
}

fn check_serial(path: &Path, state: &CardState, serial: Option<u32>) -> Result<(), SoftcardError> {
    match serial {
        Some(requested) if requested != state.serial => Err(SoftcardError::SerialMismatch {
            path: path.to_path_buf(),
            stored: state.serial,
            requested,
        }),
        _ => Ok(()),
    }
}

fn save(path: &Path, state: &CardState) -> Result<(), SoftcardError> {
    let bytes = Zeroizing::new(encode(state));
    write_atomically(path, &bytes).map_err(|source| SoftcardError::StateWrite {
        path: path.to_path_buf(),
        source,
    })
}

/// Write via a temporary file in the same directory so that a crash leaves
/// either the old or the new state, never a torn file.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_file(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // The rename is only durable once the directory entry is on disk.
    File::open(dir)?.sync_all()
}

fn write_file(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    // mode() only applies to a newly created file; a stale one keeps its own.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

// ---- JSON model -------------------------------------------------------------

/// The state file as JSON. Secrets and objects are hex; slots and object
/// tags are hex map keys ("82", "5fc10d").
#[derive(Serialize, Deserialize)]
struct StateFile {
    warning: String,
    format: u32,
    serial: u32,
    pin: String,
    pin_tries_left: u8,
    pin_tries_max: u8,
    puk: String,
    puk_tries_left: u8,
    puk_tries_max: u8,
    management_key: String,
    #[serde(default)]
    management_key_touch: bool,
    #[serde(default)]
    keys: BTreeMap<String, KeyFile>,
    #[serde(default)]
    objects: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    algorithm: String,
    private_key: String,
    pin_policy: PinPolicy,
    touch_policy: TouchPolicy,
    origin: Origin,
}

fn encode(state: &CardState) -> Vec<u8> {
    let keys = state
        .keys
        .iter()
        .map(|(slot, key)| {
            let file = KeyFile {
                algorithm: "ECCP256".into(),
                private_key: hex::encode(key.secret.to_bytes()),
                pin_policy: key.pin_policy,
                touch_policy: key.touch_policy,
                origin: key.origin,
            };
            (format!("{slot:02x}"), file)
        })
        .collect();
    let objects = state
        .objects
        .iter()
        .map(|(tag, value)| (format!("{tag:02x}"), hex::encode(value)))
        .collect();
    let file = StateFile {
        warning: WARNING.into(),
        format: FORMAT,
        serial: state.serial,
        pin: hex::encode(&*state.pin.value),
        pin_tries_left: state.pin.tries_left,
        pin_tries_max: state.pin.tries_max,
        puk: hex::encode(&*state.puk.value),
        puk_tries_left: state.puk.tries_left,
        puk_tries_max: state.puk.tries_max,
        management_key: hex::encode(*state.mgm_key),
        management_key_touch: state.mgm_touch,
        keys,
        objects,
    };
    let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
    out.push(b'\n');
    out
}

fn decode(bytes: &[u8]) -> Result<CardState, String> {
    let file: StateFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON ({e})"))?;
    if file.format != FORMAT {
        return Err(format!(
            "unsupported format {} (expected {FORMAT})",
            file.format
        ));
    }
    let pin = decode_reference("pin", &file.pin, file.pin_tries_left, file.pin_tries_max)?;
    let puk = decode_reference("puk", &file.puk, file.puk_tries_left, file.puk_tries_max)?;
    let mgm = Zeroizing::new(hex_field("management_key", &file.management_key)?);
    let mgm_key: [u8; 24] = mgm
        .as_slice()
        .try_into()
        .map_err(|_| "management_key must be 24 bytes".to_string())?;
    let mut keys = BTreeMap::new();
    for (slot, key) in &file.keys {
        let (slot, key) = decode_key(slot, key)?;
        keys.insert(slot, key);
    }
    let mut objects = BTreeMap::new();
    for (tag, value) in &file.objects {
        objects.insert(decode_tag(tag)?, hex_field("object", value)?);
    }
    Ok(CardState {
        serial: file.serial,
        pin,
        puk,
        mgm_key: Zeroizing::new(mgm_key),
        mgm_touch: file.management_key_touch,
        keys,
        objects,
    })
}

fn hex_field(name: &str, value: &str) -> Result<Vec<u8>, String> {
    hex::decode(value).map_err(|e| format!("{name} is not hex ({e})"))
}

fn decode_reference(name: &str, value: &str, left: u8, max: u8) -> Result<Reference, String> {
    let value = Zeroizing::new(hex_field(name, value)?);
    if !(1..=8).contains(&value.len()) {
        return Err(format!("{name} must be 1 to 8 bytes"));
    }
    if max == 0 || left > max {
        return Err(format!(
            "{name} retry counter {left} of {max} is impossible"
        ));
    }
    Ok(Reference {
        value,
        tries_left: left,
        tries_max: max,
    })
}

fn decode_key(slot: &str, key: &KeyFile) -> Result<(u8, SlotKey), String> {
    let slot_id = u8::from_str_radix(slot, 16)
        .ok()
        .filter(|s| is_key_slot(*s))
        .ok_or_else(|| format!("key slot {slot:?} is not a PIV key slot"))?;
    if key.algorithm != "ECCP256" {
        return Err(format!(
            "slot {slot}: unsupported algorithm {:?}",
            key.algorithm
        ));
    }
    let scalar = Zeroizing::new(hex_field("private_key", &key.private_key)?);
    let secret = crypto::p256_from_scalar(&scalar)
        .ok_or_else(|| format!("slot {slot}: private_key is not a valid P-256 scalar"))?;
    let key = SlotKey {
        secret,
        pin_policy: key.pin_policy,
        touch_policy: key.touch_policy,
        origin: key.origin,
    };
    Ok((slot_id, key))
}

fn decode_tag(tag: &str) -> Result<u32, String> {
    u32::from_str_radix(tag, 16)
        .ok()
        .filter(|t| (1..=0xFF_FFFF).contains(t))
        .ok_or_else(|| format!("object tag {tag:?} is not a 1 to 3 byte hex tag"))
}

/// Slots that can hold a key: 9A, 9C, 9D, 9E and the retired 82–95.
pub fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9A | 0x9C | 0x9D | 0x9E | 0x82..=0x95)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_json() {
        let mut state = CardState::factory(12345678);
        state.keys.insert(
            0x82,
            SlotKey {
                secret: crypto::generate_p256(),
                pin_policy: PinPolicy::Always,
                touch_policy: TouchPolicy::Cached,
                origin: Origin::Imported,
            },
        );
        state.objects.insert(0x5FC10D, vec![1, 2, 3]);
        state.pin.tries_left = 1;
        let back = decode(&encode(&state)).unwrap();
        assert_eq!(back.serial, 12345678);
        assert_eq!(back.pin.tries_left, 1);
        assert_eq!(*back.mgm_key, DEFAULT_MGM_KEY);
        assert_eq!(back.objects[&0x5FC10D], vec![1, 2, 3]);
        let key = &back.keys[&0x82];
        assert_eq!(key.secret.to_bytes(), state.keys[&0x82].secret.to_bytes());
        assert_eq!(key.pin_policy, PinPolicy::Always);
        assert_eq!(key.origin, Origin::Imported);
    }

    #[test]
    fn damaged_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.json");
        let good = String::from_utf8(encode(&CardState::factory(5))).unwrap();
        let damaged = [
            String::new(),
            "{".into(),
            good.replace("\"format\": 1", "\"format\": 7"),
            good.replace("\"pin_tries_left\": 3", "\"pin_tries_left\": 9"),
            good.replace("0102030405060708", "01020304"),
            good.replace("\"pin\": \"", "\"pin\": \"zz"),
        ];
        for text in damaged {
            fs::write(&path, &text).unwrap();
            let err = StateStore::open(&path, None).err().expect(&text);
            assert!(matches!(err, SoftcardError::StateCorrupt { .. }), "{err}");
            assert!(err.to_string().contains("card.json"), "{err}");
        }
    }

    #[test]
    fn new_file_is_private_and_serial_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.json");
        let store = StateStore::open(&path, None).unwrap();
        let serial = store.get().serial;
        assert!((10_000_000..100_000_000).contains(&serial));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(StateStore::open(&path, Some(serial)).is_ok());
        let err = StateStore::open(&path, Some(serial + 1)).err().unwrap();
        assert!(matches!(err, SoftcardError::SerialMismatch { .. }));
    }

    #[test]
    fn update_persists_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.json");
        let mut store = StateStore::open(&path, Some(7)).unwrap();
        store.update(|s| s.pin.tries_left = 2).unwrap();
        let reread = StateStore::open(&path, Some(7)).unwrap();
        assert_eq!(reread.get().pin.tries_left, 2);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
