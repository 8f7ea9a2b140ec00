//! `keybound`: the command-line entry point.

mod cli;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Every heap block is zeroed when it is freed, so plaintext and key bytes in
/// buffers we do not own (redb, fuser, the token crates) do not outlive their
/// use (docs/threat-model.md, "Memory hygiene").
#[global_allocator]
static ALLOCATOR: keybound::secrets::WipingAllocator = keybound::secrets::WipingAllocator;

fn init_logging(verbose: u8) {
    let default = match verbose {
        // The yubikey crate logs every failed probe of a non-PIV card as an error;
        // our own errors say what matters.
        0 => "warn,yubikey=off",
        1 => "keybound=info",
        _ => "keybound=debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A detached daemon logs to a file: colour codes would only get in the way.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = if e.use_stderr() {
                cli::exitcodes::USAGE
            } else {
                cli::exitcodes::OK // --help, --version
            };
            std::process::exit(code);
        }
    };
    init_logging(cli.verbose);
    if let Err(e) = keybound::secrets::harden_process() {
        eprintln!("keybound: cannot switch off core dumps: {e}");
        std::process::exit(cli::exitcodes::OTHER);
    }
    if let Err(err) = cli::run(cli) {
        eprintln!("keybound: {}", cli::error_text(&err));
        std::process::exit(cli::exitcodes::for_error(&err));
    }
}
