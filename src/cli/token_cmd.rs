//! `keybound token …`: list tokens, provision one, export its certificate.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use keybound::secrets::{SecretBytes, read_secret_file};
use keybound::token::{
    self, LastTry, Pin, PinPolicyChoice, SetupOptions, SetupPrompts, Token, TokenError, TokenInfo,
    TokenName, TouchPolicyChoice,
};

use super::prompt;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Show every PIV token present: reader, serial, firmware, keybound keys, PIN tries left.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Provision a token for keybound: a P-256 key generated on the card in a free
    /// retired slot (82–95) and a certificate naming keybound. Factory PIN, PUK and
    /// management key are replaced. Never overwrites an existing key.
    Setup(SetupArgs),
    /// Write the certificate of a keybound key (PEM), so an admin can enrol the
    /// token into a vault without having it at hand.
    Export {
        /// The token's serial number (needed when several are plugged in).
        #[arg(long)]
        serial: Option<u32>,
        /// The retired slot, hex (e.g. 82); defaults to the token's only keybound key.
        #[arg(long, value_parser = parse_slot)]
        slot: Option<u8>,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct SetupArgs {
    /// The token's serial number (needed when several are plugged in).
    #[arg(long)]
    serial: Option<u32>,
    /// Use this retired slot (hex, 82–95) instead of the first free one.
    #[arg(long, value_parser = parse_slot)]
    slot: Option<u8>,
    /// When the card asks for the PIN. "always" costs nothing extra: keybound
    /// verifies the PIN right before every unlock anyway.
    #[arg(long, value_enum, default_value = "always")]
    pin_policy: PinPolicyChoice,
    /// Whether the card wants a touch for each use of the key (real tokens only;
    /// the software card has no button).
    #[arg(long, value_enum, default_value = "never")]
    touch_policy: TouchPolicyChoice,
    /// A name for the key, stored as the certificate's common name.
    #[arg(long, default_value = "keybound")]
    label: String,
    /// Read the current PIN from FILE (`-` for stdin) instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// Read the new PIN (replacing the factory PIN) from FILE instead of the terminal.
    #[arg(long, value_name = "FILE")]
    new_pin_file: Option<PathBuf>,
    /// The card's management key (48 hex digits in FILE), if it is custom and
    /// not PIN-protected.
    #[arg(long, value_name = "FILE")]
    management_key_file: Option<PathBuf>,
    /// Allow spending the last PIN try (a wrong PIN then blocks the card).
    #[arg(long)]
    allow_last_pin_try: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn parse_slot(s: &str) -> Result<u8, String> {
    let slot = u8::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{s:?} is not a hex slot number like 82"))?;
    if !(0x82..=0x95).contains(&slot) {
        return Err(format!("slot {slot:02x} is not a retired PIV slot (82–95)"));
    }
    Ok(slot)
}

pub fn run(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::List { json } => list(json),
        TokenCommand::Setup(args) => setup(args),
        TokenCommand::Export {
            serial,
            slot,
            output,
        } => export(serial, slot, output),
    }
}

fn list(json: bool) -> Result<()> {
    let tokens = token::list_tokens()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    if tokens.is_empty() {
        println!(
            "No token is plugged in (readers: {}).",
            token::reader_names()?.join(", ")
        );
        return Ok(());
    }
    for info in &tokens {
        print_token(info);
    }
    Ok(())
}

fn print_token(info: &TokenInfo) {
    let Some(serial) = info.serial else {
        println!(
            "{}: a card that is not a usable PIV token ({})",
            info.reader,
            info.problem.as_deref().unwrap_or("unknown")
        );
        return;
    };
    let tries = match info.pin_tries_left {
        Some(0) => "PIN BLOCKED".to_string(),
        Some(n) => format!("PIN tries left: {n}"),
        None => "PIN tries unknown".to_string(),
    };
    println!(
        "token {serial}  reader \"{}\"  firmware {}  {tries}",
        info.reader,
        info.version.as_deref().unwrap_or("?")
    );
    if info.keybound_keys.is_empty() {
        println!("  no keybound key; provision one with `keybound token setup --serial {serial}`");
    }
    for key in &info.keybound_keys {
        println!(
            "  slot {}  {}  fingerprint {}  PIN {}  touch {}",
            key.slot,
            key.label,
            key.fingerprint,
            key.pin_policy.as_deref().unwrap_or("?"),
            key.touch_policy.as_deref().unwrap_or("?"),
        );
    }
}

/// Setup's prompts: files when given, else the terminal; progress on stderr.
struct CliPrompts<'a> {
    args: &'a SetupArgs,
}

impl SetupPrompts for CliPrompts<'_> {
    fn current_pin(&mut self, token: &TokenName) -> Result<Pin, TokenError> {
        prompt::pin(self.args.pin_file.as_deref(), &format!("PIN of {token}: "))
            .map_err(|e| to_token_error(e, token))
    }

    fn new_pin(&mut self, token: &TokenName) -> Result<Pin, TokenError> {
        if self.args.new_pin_file.is_none() {
            eprintln!(
                "Choose a new PIN for {token}: 6 to 8 characters (letters and symbols allowed). \
                 The PUK will be set to the same value. A blocked PIN and PUK cannot be recovered."
            );
        }
        prompt::new_pin(self.args.new_pin_file.as_deref()).map_err(|e| to_token_error(e, token))
    }

    fn step(&mut self, message: &str) {
        eprintln!("… {message}");
    }
}

/// Prompts report through TokenError; keep the message, drop the type.
fn to_token_error(err: anyhow::Error, token: &TokenName) -> TokenError {
    match err.downcast::<TokenError>() {
        Ok(t) => t,
        Err(other) => match other.downcast::<keybound::secrets::SecretError>() {
            Ok(s) => TokenError::Secret(s),
            Err(other) => TokenError::Device {
                token: token.clone(),
                what: "reading the PIN".into(),
                detail: super::error_text(&other),
            },
        },
    }
}

fn management_key(file: Option<&std::path::Path>) -> Result<Option<SecretBytes>> {
    let Some(path) = file else { return Ok(None) };
    let hex_key = read_secret_file(path, "management key")?;
    let text = std::str::from_utf8(hex_key.expose())
        .ok()
        .map(str::trim)
        .filter(|t| t.len() == 48)
        .with_context(|| format!("{} must hold 48 hex digits", path.display()))?;
    let raw = hex::decode(text).with_context(|| format!("{} is not hex", path.display()))?;
    Ok(Some(SecretBytes::from_vec(raw)?))
}

fn setup(args: SetupArgs) -> Result<()> {
    let mut token = Token::open(args.serial)?;
    let opts = SetupOptions {
        slot: args.slot,
        pin_policy: args.pin_policy,
        touch_policy: args.touch_policy,
        label: args.label.clone(),
        management_key: management_key(args.management_key_file.as_deref())?,
        last_try: if args.allow_last_pin_try {
            LastTry::Allow
        } else {
            LastTry::Refuse
        },
    };
    let report = token::setup(&mut token, &opts, &mut CliPrompts { args: &args })
        .with_context(|| format!("setting up {} for keybound failed", token.name()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "Token {} is ready: keybound key in slot {} (fingerprint {}), PIN policy {}, touch policy {}.",
        report.serial,
        report.slot,
        report.public_key.fingerprint(),
        format!("{:?}", report.pin_policy).to_lowercase(),
        format!("{:?}", report.touch_policy).to_lowercase(),
    );
    if report.pin_changed {
        println!(
            "The factory PIN was replaced{}.",
            if report.puk_changed {
                " and the PUK set to the new PIN"
            } else {
                ""
            }
        );
    }
    if report.management_key_protected {
        println!("The management key is random and PIN-protected.");
    }
    Ok(())
}

fn export(serial: Option<u32>, slot: Option<u8>, output: Option<PathBuf>) -> Result<()> {
    let mut token = Token::open(serial)?;
    let keys = token.keybound_keys()?;
    let slot = match (slot, keys.as_slice()) {
        (Some(s), _) => s,
        (None, [only]) => only.slot,
        (None, []) => bail!(
            "{} has no keybound key; provision one with `keybound token setup`",
            token.name()
        ),
        (None, _) => bail!(
            "{} has several keybound keys; choose one with --slot",
            token.name()
        ),
    };
    let der = token
        .certificate_der(slot)?
        .ok_or_else(|| TokenError::NoKeyInSlot {
            token: token.name().clone(),
            slot,
        })?;
    let pem = pem_encode(&der);
    match output {
        Some(path) => std::fs::write(&path, pem)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().write_all(pem.as_bytes())?,
    }
    Ok(())
}

fn pem_encode(der: &[u8]) -> String {
    use der::pem::LineEnding;
    der::pem::encode_string("CERTIFICATE", LineEnding::LF, der).unwrap_or_default()
}
