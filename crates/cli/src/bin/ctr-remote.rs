//! `ctr-remote`: eStargz tooling for image publishers and node operators.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ctr-remote",
    version,
    about = "eStargz image and layer tooling"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work on single layer blobs (build, verify, toc, extract).
    #[command(subcommand)]
    Blob(cli::blob::BlobCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli.log_level);
    let result = match cli.command {
        Command::Blob(cmd) => cli::blob::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctr-remote: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
