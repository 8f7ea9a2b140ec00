//! The command line: the only layer that prints to or reads from a user.

pub mod exitcodes;
mod prompt;
mod token_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keybound",
    version,
    about = "An encrypted virtual disk that is open only while its owner's hardware key is plugged in",
    long_about = "An encrypted virtual disk that is open only while its owner's hardware key is \
                  plugged in.\n\nSecrets (PINs, passwords) are read from the terminal without echo, \
                  or from files given with --pin-file and friends (`-` reads stdin); never from \
                  the command line.\n\nExit codes are stable; see docs/user-guide.md."
)]
pub struct Cli {
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// PIV tokens (YubiKeys, smart cards): list, set up, export.
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Token(cmd) => token_cmd::run(cmd),
    }
}
