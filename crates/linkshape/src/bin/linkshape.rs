//! CLI: bring a shaped link up between two namespaces and keep it until Ctrl-C
//! or until a given command (run in the client namespace) exits.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Shaped link between two network namespaces (TUN delay line + tbf)")]
struct Args {
    /// lan (1 ms, 1 Gbit), wan (20 ms, 100 Mbit) or slow (100 ms, 20 Mbit).
    #[arg(long, default_value = "wan")]
    profile: String,
    /// Override the round-trip time in milliseconds.
    #[arg(long)]
    rtt_ms: Option<u64>,
    /// Override the rate in Mbit/s.
    #[arg(long)]
    rate_mbit: Option<u64>,
    /// Namespace name prefix (`PREFIX-srv`, `PREFIX-cli`).
    #[arg(long, default_value = "lsh")]
    prefix: String,
    /// Command to run in the client namespace; the link goes down when it exits.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut p = linkshape::Profile::named(&a.profile)?;
    if let Some(ms) = a.rtt_ms {
        p.rtt = std::time::Duration::from_millis(ms);
    }
    if let Some(r) = a.rate_mbit {
        p.rate_mbit = r;
    }
    let link = linkshape::Link::up(&a.prefix, p)?;
    eprintln!(
        "link up: {} ({}) <-> {} ({}), rtt {:?}, {} Mbit/s",
        link.server_ns, link.server_addr, link.client_ns, link.client_addr, p.rtt, p.rate_mbit
    );
    if a.command.is_empty() {
        eprintln!("press Enter to tear down");
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
    } else {
        let status = link
            .command(linkshape::Side::Client, &a.command[0])
            .args(&a.command[1..])
            .status()?;
        eprintln!("command exited: {status}");
        // The link goes down first; then the command's own exit status is ours, so a
        // failing command fails whoever ran linkshape.
        drop(link);
        std::process::exit(status.code().unwrap_or(1));
    }
    drop(link);
    Ok(())
}
