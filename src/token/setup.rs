//! Provisioning a token for keybound, the way age-plugin-yubikey does it:
//! a P-256 key generated on the card in a free retired slot, a self-signed
//! certificate naming keybound in that slot, factory PIN/PUK replaced, and a
//! PIN-protected management key so later key management needs only the PIN.
//!
//! It never overwrites a key: a slot that holds a key or certificate is skipped
//! (or refused when named explicitly).

use std::str::FromStr;
use std::time::Duration;

use der::asn1::UtcTime;
use yubikey::piv::{self, AlgorithmId, ManagementSlotId, SlotId};
use yubikey::{Certificate, MgmKey, PinPolicy, TouchPolicy};

use super::binding::{CERT_ORGANIZATION, TokenPublicKey};
use super::device::{LastTry, retired_slot, retired_slots};
use super::{Pin, Token, TokenError, TokenName};
use crate::secrets::SecretBytes;

pub const DEFAULT_PIN: &[u8] = b"123456";
pub const DEFAULT_PUK: &[u8] = b"12345678";

/// How often the card wants the PIN for the keybound key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinPolicyChoice {
    /// PIN before every use of the key (keybound verifies right before each unlock anyway).
    Always,
    /// PIN once per card session.
    Once,
}

/// Whether the card wants a touch for the keybound key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TouchPolicyChoice {
    Never,
    Always,
    /// A touch is remembered for 15 seconds.
    Cached,
}

impl From<PinPolicyChoice> for PinPolicy {
    fn from(p: PinPolicyChoice) -> Self {
        match p {
            PinPolicyChoice::Always => PinPolicy::Always,
            PinPolicyChoice::Once => PinPolicy::Once,
        }
    }
}

impl From<TouchPolicyChoice> for TouchPolicy {
    fn from(t: TouchPolicyChoice) -> Self {
        match t {
            TouchPolicyChoice::Never => TouchPolicy::Never,
            TouchPolicyChoice::Always => TouchPolicy::Always,
            TouchPolicyChoice::Cached => TouchPolicy::Cached,
        }
    }
}

pub struct SetupOptions {
    /// A specific retired slot (0x82–0x95), or the first free one.
    pub slot: Option<u8>,
    pub pin_policy: PinPolicyChoice,
    pub touch_policy: TouchPolicyChoice,
    /// The certificate's common name.
    pub label: String,
    /// A custom management key (24 bytes), if the card has one that is not PIN-protected.
    pub management_key: Option<SecretBytes>,
    pub last_try: LastTry,
}

/// Where setup gets secrets and tells the user what is happening. The CLI
/// implements it with terminal prompts or files; nothing here prints.
pub trait SetupPrompts {
    /// The card's current PIN (it is not the factory default).
    fn current_pin(&mut self, token: &TokenName) -> Result<Pin, TokenError>;
    /// A new PIN to replace the factory default.
    fn new_pin(&mut self, token: &TokenName) -> Result<Pin, TokenError>;
    /// A step is starting ("generating a P-256 key in slot 82"), or the card wants a touch.
    fn step(&mut self, message: &str);
}

#[derive(Debug, serde::Serialize)]
pub struct SetupReport {
    pub serial: u32,
    pub reader: String,
    pub slot: String,
    #[serde(serialize_with = "serialize_fingerprint")]
    pub public_key: TokenPublicKey,
    pub pin_changed: bool,
    pub puk_changed: bool,
    pub management_key_protected: bool,
    pub pin_policy: PinPolicyChoice,
    pub touch_policy: TouchPolicyChoice,
}

fn serialize_fingerprint<S: serde::Serializer>(
    key: &TokenPublicKey,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&key.fingerprint())
}

/// Provision `token` for keybound.
pub fn setup(
    token: &mut Token,
    opts: &SetupOptions,
    prompts: &mut dyn SetupPrompts,
) -> Result<SetupReport, TokenError> {
    let name = token.name().clone();
    let slot = choose_slot(token, opts.slot)?;

    let (pin, pin_changed, puk_changed) = unlock_pin(token, opts, prompts)?;
    let management_key_protected = authenticate_management(token, opts, prompts)?;

    prompts.step(&format!(
        "generating a P-256 key in slot {slot:02x} of {name}"
    ));
    let spki = piv::generate(
        token.yubikey(),
        SlotId::Retired(retired_slot(slot)?),
        AlgorithmId::EccP256,
        opts.pin_policy.into(),
        opts.touch_policy.into(),
    )
    .map_err(token.device_err("generating the key"))?;
    let public_key = TokenPublicKey::from_spki(&spki)?;

    if opts.pin_policy == PinPolicyChoice::Always {
        // The key wants the PIN immediately before each use, signing included.
        // No retry-count check here: it would re-select the applet and drop the
        // management-key authentication the certificate write needs.
        token.verify_pin_now(&pin)?;
    }
    write_certificate(token, slot, spki, opts, prompts)?;
    Ok(SetupReport {
        serial: token.serial(),
        reader: token.reader().to_string(),
        slot: format!("{slot:02x}"),
        public_key,
        pin_changed,
        puk_changed,
        management_key_protected,
        pin_policy: opts.pin_policy,
        touch_policy: opts.touch_policy,
    })
}

fn choose_slot(token: &mut Token, wanted: Option<u8>) -> Result<u8, TokenError> {
    if let Some(slot) = wanted {
        retired_slot(slot)?;
        if token.slot_in_use(slot)? {
            return Err(TokenError::SlotOccupied {
                token: token.name().clone(),
                slot,
            });
        }
        return Ok(slot);
    }
    for slot in retired_slots() {
        if !token.slot_in_use(slot)? {
            return Ok(slot);
        }
    }
    Err(TokenError::NoFreeSlot {
        token: token.name().clone(),
    })
}

/// Is this PIN/PUK/management key still the factory default? `None` when the
/// card cannot say (firmware before 5.3).
fn is_default(token: &mut Token, which: ManagementSlotId) -> Option<bool> {
    piv::metadata(token.yubikey(), SlotId::Management(which))
        .ok()
        .and_then(|m| m.default)
}

/// Leave the card with its PIN verified; replace factory PIN and PUK on the way.
/// Returns the PIN, and whether PIN and PUK were changed.
fn unlock_pin(
    token: &mut Token,
    opts: &SetupOptions,
    prompts: &mut dyn SetupPrompts,
) -> Result<(Pin, bool, bool), TokenError> {
    let name = token.name().clone();
    // Checked before prompting: do not ask for a PIN the card will not take.
    token.check_pin_tries(opts.last_try)?;
    if is_default(token, ManagementSlotId::Pin) != Some(true) {
        let pin = prompts.current_pin(&name)?;
        token.verify_pin_now(&pin)?;
        return Ok((pin, false, false));
    }
    prompts.step(&format!("{name} still has the factory PIN; replacing it"));
    let new_pin = prompts.new_pin(&name)?;
    if new_pin.expose() == DEFAULT_PIN {
        return Err(TokenError::Device {
            token: name,
            what: "changing the PIN".into(),
            detail: "the new PIN must differ from the factory default 123456".into(),
        });
    }
    token
        .yubikey()
        .change_pin(DEFAULT_PIN, new_pin.expose())
        .map_err(|e| TokenError::from_device(e, &name, "changing the PIN"))?;
    // Like age-plugin-yubikey: the PUK becomes the new PIN, so a user who knows
    // the PIN can unblock it, and nobody can with the printed factory PUK.
    let puk_changed = if is_default(token, ManagementSlotId::Puk) == Some(true) {
        prompts.step("the PUK is the factory default; setting it to the new PIN");
        token
            .yubikey()
            .change_puk(DEFAULT_PUK, new_pin.expose())
            .map_err(|e| TokenError::from_device(e, &name, "changing the PUK"))?;
        true
    } else {
        false
    };
    token.verify_pin_now(&new_pin)?;
    Ok((new_pin, true, puk_changed))
}

/// Authenticate with the management key; migrate a factory key to a random
/// PIN-protected one. Needs the PIN verified. Returns whether the management
/// key is PIN-protected afterwards.
fn authenticate_management(
    token: &mut Token,
    opts: &SetupOptions,
    prompts: &mut dyn SetupPrompts,
) -> Result<bool, TokenError> {
    let name = token.name().clone();
    if let Some(key) = &opts.management_key {
        let key =
            MgmKey::from_bytes(key.expose()).map_err(|_| TokenError::UnknownManagementKey {
                token: name.clone(),
            })?;
        authenticate_with(token, key)?;
        return Ok(false);
    }
    if is_default(token, ManagementSlotId::Management) != Some(false)
        && token.yubikey().authenticate(MgmKey::default()).is_ok()
    {
        prompts.step("replacing the factory management key with a random PIN-protected one");
        protect_new_management_key(token)?;
        return Ok(true);
    }
    let protected =
        MgmKey::get_protected(token.yubikey()).map_err(|_| TokenError::UnknownManagementKey {
            token: name.clone(),
        })?;
    authenticate_with(token, protected)?;
    Ok(true)
}

fn authenticate_with(token: &mut Token, key: MgmKey) -> Result<(), TokenError> {
    let name = token.name().clone();
    token
        .yubikey()
        .authenticate(key)
        .map_err(|_| TokenError::ManagementKeyRejected { token: name })
}

fn protect_new_management_key(token: &mut Token) -> Result<(), TokenError> {
    let name = token.name().clone();
    let new_key = MgmKey::generate();
    let bytes = SecretBytes::from_slice(new_key.as_ref())?;
    if let Err(e) = new_key.set_protected(token.yubikey()) {
        // The card may hold the new key without its PIN-protected copy. Put the
        // factory key back rather than leave a key nobody knows.
        if let Ok(k) = MgmKey::from_bytes(bytes.expose())
            && token.yubikey().authenticate(k).is_ok()
        {
            let _ = MgmKey::default().set_manual(token.yubikey(), false);
        }
        return Err(TokenError::from_device(
            e,
            &name,
            "storing the PIN-protected management key",
        ));
    }
    // set_protected leaves the session authenticated with the old key on some
    // firmware; authenticate with the new one so key generation is allowed.
    let key = MgmKey::from_bytes(bytes.expose())
        .map_err(|_| TokenError::ManagementKeyRejected { token: name })?;
    authenticate_with(token, key)
}

fn write_certificate(
    token: &mut Token,
    slot: u8,
    spki: x509_cert::spki::SubjectPublicKeyInfoOwned,
    opts: &SetupOptions,
    prompts: &mut dyn SetupPrompts,
) -> Result<(), TokenError> {
    let name = token.name().clone();
    let subject = certificate_subject(&opts.label)?;
    let validity = certificate_validity()?;
    let mut serial_bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial_bytes);
    serial_bytes[0] &= 0x7f; // positive
    serial_bytes[0] |= 0x01; // and no leading zero byte
    let serial = x509_cert::serial_number::SerialNumber::new(&serial_bytes)
        .map_err(|e| TokenError::BadCertificate(e.to_string()))?;
    if opts.touch_policy != TouchPolicyChoice::Never {
        prompts.step(&format!("touch {name} to sign its certificate"));
    }
    prompts.step(&format!(
        "writing a self-signed keybound certificate to slot {slot:02x}"
    ));
    Certificate::generate_self_signed::<_, p256::NistP256>(
        token.yubikey(),
        SlotId::Retired(retired_slot(slot)?),
        serial,
        validity,
        subject,
        spki,
        no_extensions::<p256::NistP256>,
    )
    .map_err(|e| TokenError::from_device(e, &name, "signing the certificate"))?;
    Ok(())
}

/// keybound's certificates carry no extensions; the binding is the public key.
fn no_extensions<KT: yubikey::certificate::yubikey_signer::KeyType>(
    _: &mut x509_cert::builder::CertificateBuilder<
        '_,
        yubikey::certificate::yubikey_signer::Signer<'_, KT>,
    >,
) -> der::Result<()> {
    Ok(())
}

fn certificate_subject(label: &str) -> Result<x509_cert::name::Name, TokenError> {
    let clean: String = label
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | '@'))
        .collect();
    let cn = if clean.trim().is_empty() {
        "keybound".to_string()
    } else {
        clean.trim().to_string()
    };
    let dn = format!(
        "CN={cn},OU={},O={CERT_ORGANIZATION}",
        env!("CARGO_PKG_VERSION")
    );
    x509_cert::name::Name::from_str(&dn).map_err(|e| TokenError::BadCertificate(e.to_string()))
}

/// Valid from now for 20 years; keybound does not rely on the dates (the
/// binding is the public key), but X.509 needs some.
fn certificate_validity() -> Result<x509_cert::time::Validity, TokenError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let bad = |e: der::Error| TokenError::BadCertificate(e.to_string());
    let start = UtcTime::from_unix_duration(Duration::from_secs(now.as_secs())).map_err(bad)?;
    // UTCTime ends in 2049; stay inside it.
    let end_secs = (now.as_secs() + 20 * 365 * 86_400).min(2_524_607_999);
    let end = UtcTime::from_unix_duration(Duration::from_secs(end_secs)).map_err(bad)?;
    Ok(x509_cert::time::Validity {
        not_before: x509_cert::time::Time::UtcTime(start),
        not_after: x509_cert::time::Time::UtcTime(end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_names_keybound_and_sanitises_the_label() {
        let name = certificate_subject("alice,O=evil").unwrap().to_string();
        assert!(name.contains("O=keybound"), "{name}");
        assert!(!name.contains("O=evil"), "{name}");
        let name = certificate_subject("").unwrap().to_string();
        assert!(name.contains("CN=keybound"), "{name}");
    }

    #[test]
    fn validity_is_representable() {
        let v = certificate_validity().unwrap();
        assert!(v.not_before.to_unix_duration() < v.not_after.to_unix_duration());
    }
}
