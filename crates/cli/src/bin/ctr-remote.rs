//! `ctr-remote`: eStargz tooling for image publishers and node operators.
//! Subcommands it does not know are handed to containerd's `ctr`.

use std::ffi::{OsStr, OsString};

use clap::{CommandFactory, Parser, Subcommand};

use cli::image;

#[derive(Debug, Parser)]
#[command(
    name = "ctr-remote",
    version,
    about = "eStargz image and layer tooling; other subcommands go to ctr"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// containerd socket (passed on to ctr).
    #[arg(
        short = 'a',
        long,
        global = true,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: String,
    /// containerd namespace (passed on to ctr).
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// ctr's global flags, accepted for the reference's command lines: --debug logs
    /// at debug level; --timeout and --connect-timeout are for ctr's commands only.
    #[arg(long, global = true, hide = true)]
    debug: bool,
    #[arg(long, global = true, hide = true, value_name = "DURATION")]
    timeout: Option<String>,
    #[arg(long, global = true, hide = true, value_name = "DURATION")]
    connect_timeout: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work on single layer blobs (build, verify, toc, extract).
    #[command(subcommand)]
    Blob(cli::blob::BlobCommand),
    /// Convert and inspect images (other image subcommands go to `ctr images`).
    #[command(subcommand, visible_aliases = ["images", "i"])]
    Image(image::ImageCommand),
    /// Work on single layers of images (mount one lazily, for debugging and benchmarks).
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Check this node's lazy-pulling set-up end to end and say what is wrong.
    Doctor(cli::doctor::DoctorArgs),
}

#[derive(Debug, Subcommand)]
enum LayerCommand {
    /// Mount one layer lazily through FUSE, in the foreground, until Ctrl-C/SIGTERM.
    Mount(cli::mount::MountArgs),
}

/// Global flags that take a value (ours and ctr's), so a pre-parse can skip them.
const VALUE_FLAGS: &[&str] = &[
    "--log-level",
    "--address",
    "-a",
    "--namespace",
    "-n",
    "--timeout",
    "--connect-timeout",
];

/// The positions of the first two words that are not flags or flag values.
fn words(args: &[OsString]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < args.len() && out.len() < 2 {
        let a = args[i].to_string_lossy();
        if a == "--" {
            break;
        }
        if a.starts_with('-') {
            if VALUE_FLAGS.contains(&a.as_ref()) {
                i += 1;
            }
        } else {
            out.push(i);
        }
        i += 1;
    }
    out
}

/// Names and aliases of a command's subcommands, read from the clap definition so
/// a subcommand added there is never mistaken for one of `ctr`'s.
fn names(cmd: &clap::Command) -> Vec<String> {
    let mut out = vec!["help".to_string()];
    for s in cmd.get_subcommands() {
        out.push(s.get_name().to_string());
        out.extend(s.get_all_aliases().map(str::to_string));
    }
    out
}

/// Whether the command line belongs to `ctr` rather than to this binary.
fn for_ctr(args: &[OsString]) -> bool {
    let w = words(args);
    let Some(&first) = w.first() else {
        return false;
    };
    let top = Cli::command();
    let cmd = args[first].to_string_lossy();
    if !names(&top).iter().any(|n| *n == cmd) {
        return true;
    }
    let Some(sub) = top
        .get_subcommands()
        .find(|s| s.get_name() == cmd || s.get_all_aliases().any(|a| a == cmd))
    else {
        return false;
    };
    // `image ls`, `image rm` ... are ctr's; `blob` has no such neighbours.
    if sub.get_name() == "image" {
        if let Some(&second) = w.get(1) {
            let s = args[second].to_string_lossy();
            return !names(sub).iter().any(|n| *n == s);
        }
    }
    false
}

/// Replaces this process with `ctr` and the same arguments, less our own
/// `--log-level`. Only returns on failure.
fn exec_ctr(args: &[OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let ctr = std::env::var_os("CTR_REMOTE_CTR").unwrap_or_else(|| OsString::from("/usr/bin/ctr"));
    let mut pass: Vec<&OsStr> = Vec::with_capacity(args.len());
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--" {
            pass.extend(args[i..].iter().map(OsString::as_os_str));
            break;
        }
        if a == "--log-level" {
            i += 2;
            continue;
        }
        if !a.starts_with("--log-level=") {
            pass.push(&args[i]);
        }
        i += 1;
    }
    let err = std::process::Command::new(&ctr).args(pass).exec();
    std::io::Error::new(
        err.kind(),
        format!("running {}: {err}", std::path::Path::new(&ctr).display()),
    )
}

fn main() -> std::process::ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if for_ctr(&args) {
        let e = exec_ctr(&args);
        eprintln!("ctr-remote: error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse_from(&args);
    cli::init_logging(if cli.debug { "debug" } else { &cli.log_level });
    let result = match cli.command {
        Command::Blob(cmd) => cli::blob::run(cmd),
        Command::Image(cmd) => image::run(
            cmd,
            &image::Containerd {
                address: cli.address.clone(),
                namespace: cli.namespace.clone(),
            },
        ),
        Command::Layer(LayerCommand::Mount(args)) => cli::mount::run(args),
        Command::Doctor(args) => cli::doctor::run(args, &cli.address, &cli.namespace),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctr-remote: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
