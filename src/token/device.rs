//! An open PIV token: the operations keybound needs from the card itself.

use yubikey::piv::{self, AlgorithmId, RetiredSlotId, SlotId};
use yubikey::{Certificate, YubiKey};

use super::binding::{CERT_ORGANIZATION, SharedSecret, TokenPublicKey};
use super::{Pin, TokenError, TokenName, readers};

/// The retired PIV slots (82–95), where keybound keeps its keys.
pub fn retired_slots() -> impl Iterator<Item = u8> {
    0x82u8..=0x95
}

pub(crate) fn retired_slot(slot: u8) -> Result<RetiredSlotId, TokenError> {
    RetiredSlotId::try_from(slot).map_err(|_| TokenError::NotRetiredSlot { slot })
}

/// Whether a verify may spend the card's last PIN try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LastTry {
    /// Refuse when only one try is left (the safe default).
    #[default]
    Refuse,
    /// The user asked for it explicitly.
    Allow,
}

/// A keybound key found on a token.
#[derive(Debug, Clone)]
pub struct KeySlot {
    pub slot: u8,
    pub public_key: TokenPublicKey,
    /// The certificate's common name (the label chosen at setup).
    pub label: String,
}

pub struct Token {
    yubikey: YubiKey,
    name: TokenName,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.name)
    }
}

impl Token {
    /// Open the token with this serial, or the only token present if `None`.
    pub fn open(serial: Option<u32>) -> Result<Self, TokenError> {
        let present = readers::piv_tokens()?;
        let chosen =
            match serial {
                Some(want) => present.iter().find(|t| t.serial == want).ok_or_else(|| {
                    TokenError::NotFound {
                        serial: want,
                        present: readers::describe(&present),
                    }
                })?,
                None => match present.as_slice() {
                    [] => return Err(TokenError::NoToken),
                    [only] => only,
                    _ => {
                        return Err(TokenError::Ambiguous {
                            present: readers::describe(&present),
                        });
                    }
                },
            };
        Self::open_reader(&chosen.reader)
    }

    /// Open the token in the named reader.
    pub fn open_reader(reader: &str) -> Result<Self, TokenError> {
        let name = TokenName {
            serial: None,
            reader: Some(reader.to_string()),
        };
        let yubikey = readers::open_yubikey(reader).map_err(|e| match e {
            TokenError::Device { .. } => TokenError::NoToken,
            other => other,
        })?;
        let serial = u32::from(yubikey.serial());
        Ok(Token {
            yubikey,
            name: TokenName {
                serial: Some(serial),
                ..name
            },
        })
    }

    /// Find the token that holds `public_key`: the one with `serial` if given,
    /// else any present token. Returns the token and the slot.
    pub fn find_key(
        serial: Option<u32>,
        public_key: &TokenPublicKey,
    ) -> Result<(Self, u8), TokenError> {
        let mut token = Self::open(serial)?;
        match token.slot_of(public_key)? {
            Some(slot) => Ok((token, slot)),
            None => Err(TokenError::KeyMismatch {
                token: token.name.clone(),
                fingerprint: public_key.fingerprint(),
            }),
        }
    }

    pub fn serial(&self) -> u32 {
        self.name.serial.unwrap_or_default()
    }

    pub fn reader(&self) -> &str {
        self.yubikey.name()
    }

    pub fn name(&self) -> &TokenName {
        &self.name
    }

    pub fn version(&self) -> String {
        self.yubikey.version().to_string()
    }

    pub(crate) fn yubikey(&mut self) -> &mut YubiKey {
        &mut self.yubikey
    }

    pub(crate) fn device_err(
        &self,
        what: &'static str,
    ) -> impl Fn(yubikey::Error) -> TokenError + '_ {
        move |e| TokenError::from_device(e, &self.name, what)
    }

    /// PIN tries left. Costs no try.
    pub fn pin_tries_left(&mut self) -> Result<u8, TokenError> {
        let name = self.name.clone();
        self.yubikey
            .get_pin_retries()
            .map_err(|e| TokenError::from_device(e, &name, "reading the PIN retry counter"))
    }

    /// Verify the PIN. Refuses to spend the last try unless `last_try` allows it,
    /// and reports how many tries are left on a wrong PIN.
    pub fn verify_pin(&mut self, pin: &Pin, last_try: LastTry) -> Result<(), TokenError> {
        self.check_pin_tries(last_try)?;
        self.verify_pin_now(pin)
    }

    /// Refuse before any PIN is sent if the PIN is blocked, or if only one try
    /// is left and `last_try` does not allow spending it. Costs no try, but
    /// re-selects the applet (which drops PIN and management-key state).
    pub(crate) fn check_pin_tries(&mut self, last_try: LastTry) -> Result<(), TokenError> {
        match self.pin_tries_left()? {
            0 => Err(TokenError::PinBlocked {
                token: self.name.clone(),
            }),
            1 if last_try == LastTry::Refuse => Err(TokenError::LastPinTry {
                token: self.name.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// VERIFY without reading the retry counter first, so the session keeps its
    /// management-key authentication. Callers check the tries beforehand.
    pub(crate) fn verify_pin_now(&mut self, pin: &Pin) -> Result<(), TokenError> {
        let name = self.name.clone();
        self.yubikey
            .verify_pin(pin.expose())
            .map_err(|e| TokenError::from_device(e, &name, "verifying the PIN"))
    }

    /// The card's half of the ECDH: shared secret with `peer` using the key in
    /// retired `slot`. The PIN must have been verified just before (PIN policy).
    pub fn ecdh(&mut self, slot: u8, peer: &TokenPublicKey) -> Result<SharedSecret, TokenError> {
        let slot_id = SlotId::Retired(retired_slot(slot)?);
        let name = self.name.clone();
        let out = piv::decrypt_data(
            &mut self.yubikey,
            &peer.to_sec1(),
            AlgorithmId::EccP256,
            slot_id,
        )
        .map_err(|e| TokenError::from_device(e, &name, "the ECDH key agreement"))?;
        SharedSecret::from_bytes(&out)
    }

    /// The public key of the keybound key in `slot`.
    pub fn public_key(&mut self, slot: u8) -> Result<TokenPublicKey, TokenError> {
        match self.keybound_key(slot)? {
            Some(key) => Ok(key.public_key),
            None => Err(TokenError::NoKeyInSlot {
                token: self.name.clone(),
                slot,
            }),
        }
    }

    /// The slot that holds `public_key`, if this token has it.
    pub fn slot_of(&mut self, public_key: &TokenPublicKey) -> Result<Option<u8>, TokenError> {
        Ok(self
            .keybound_keys()?
            .into_iter()
            .find(|k| &k.public_key == public_key)
            .map(|k| k.slot))
    }

    /// Every keybound key on the token (retired slots whose certificate keybound made).
    pub fn keybound_keys(&mut self) -> Result<Vec<KeySlot>, TokenError> {
        let mut keys = Vec::new();
        for slot in retired_slots() {
            if let Some(key) = self.keybound_key(slot)? {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    /// The certificate in `slot` as DER, if there is one.
    pub fn certificate_der(&mut self, slot: u8) -> Result<Option<Vec<u8>>, TokenError> {
        use der::Encode;
        let slot_id = SlotId::Retired(retired_slot(slot)?);
        match Certificate::read(&mut self.yubikey, slot_id) {
            Ok(cert) => Ok(cert.cert.to_der().ok()),
            Err(e @ yubikey::Error::PcscError { .. }) => Err(TokenError::from_device(
                e,
                &self.name,
                "reading a certificate",
            )),
            // Empty slot or an object that is not a certificate.
            Err(_) => Ok(None),
        }
    }

    fn keybound_key(&mut self, slot: u8) -> Result<Option<KeySlot>, TokenError> {
        let Some(der) = self.certificate_der(slot)? else {
            return Ok(None);
        };
        Ok(parse_keybound_certificate(slot, &der))
    }

    /// Whether a retired slot already holds a key or a certificate.
    pub fn slot_in_use(&mut self, slot: u8) -> Result<bool, TokenError> {
        let slot_id = SlotId::Retired(retired_slot(slot)?);
        if self.certificate_der(slot)?.is_some() {
            return Ok(true);
        }
        match piv::metadata(&mut self.yubikey, slot_id) {
            Ok(meta) => Ok(meta.public.is_some() || meta.origin.is_some()),
            Err(e @ yubikey::Error::PcscError { .. }) => Err(TokenError::from_device(
                e,
                &self.name,
                "reading slot metadata",
            )),
            // GenericError: the card says the slot is empty. NotSupported: firmware
            // before 5.3 cannot tell; the certificate check above is all we have.
            Err(_) => Ok(false),
        }
    }
}

/// A keybound key if `der` is a certificate keybound made (organisation
/// "keybound") for a P-256 key.
fn parse_keybound_certificate(slot: u8, der: &[u8]) -> Option<KeySlot> {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let subject = cert.tbs_certificate.subject.to_string();
    let is_ours = subject
        .split(',')
        .any(|part| part.trim() == format!("O={CERT_ORGANIZATION}"));
    if !is_ours {
        return None;
    }
    let label = subject
        .split(',')
        .find_map(|part| part.trim().strip_prefix("CN=").map(str::to_string))
        .unwrap_or_default();
    let public_key =
        TokenPublicKey::from_spki(&cert.tbs_certificate.subject_public_key_info).ok()?;
    Some(KeySlot {
        slot,
        public_key,
        label,
    })
}
