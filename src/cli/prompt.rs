//! Getting secrets from the user: from a file (`-` is stdin) for scripts, or
//! from the terminal without echo. Never from argv, never logged.

use std::path::Path;

use anyhow::{Context, Result, bail};
use keybound::secrets::{SecretBytes, read_secret_file};
use keybound::token::Pin;
use zeroize::Zeroize;

/// Read one line from the terminal without echo.
fn ask_terminal(question: &str) -> Result<SecretBytes> {
    let mut answer = rpassword::prompt_password(question).with_context(|| {
        format!("cannot ask on the terminal ({question}); pass the secret in a file instead")
    })?;
    let secret = SecretBytes::from_slice(answer.as_bytes());
    answer.zeroize();
    Ok(secret?)
}

fn have_terminal() -> bool {
    std::fs::File::open("/dev/tty").is_ok()
}

/// A secret from `file` if given, else from the terminal.
pub fn secret(
    file: Option<&Path>,
    what: &'static str,
    question: &str,
    flag: &str,
) -> Result<SecretBytes> {
    if let Some(path) = file {
        return Ok(read_secret_file(path, what)?);
    }
    if !have_terminal() {
        bail!("no terminal to ask for the {what}; pass it with {flag} FILE (`-` reads stdin)");
    }
    ask_terminal(question)
}

/// A new secret, typed twice on the terminal (or read once from a file).
pub fn new_secret(file: Option<&Path>, what: &'static str, flag: &str) -> Result<SecretBytes> {
    if let Some(path) = file {
        return Ok(read_secret_file(path, what)?);
    }
    if !have_terminal() {
        bail!("no terminal to ask for the new {what}; pass it with {flag} FILE (`-` reads stdin)");
    }
    let first = ask_terminal(&format!("New {what}: "))?;
    let second = ask_terminal(&format!("Repeat the new {what}: "))?;
    if !first.ct_eq(second.expose()) {
        bail!("the two {what}s differ; nothing was changed");
    }
    Ok(first)
}

pub fn pin(file: Option<&Path>, question: &str) -> Result<Pin> {
    Ok(Pin::new(secret(file, "PIN", question, "--pin-file")?)?)
}

pub fn new_pin(file: Option<&Path>) -> Result<Pin> {
    Ok(Pin::new(new_secret(file, "PIN", "--new-pin-file")?)?)
}
