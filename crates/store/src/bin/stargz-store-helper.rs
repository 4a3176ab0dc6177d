//! stargz-store-helper: hands registry credentials to a running stargz-store. Reads
//! the JSON containers/image writes to its `additional-layer-store-auth-helper` from
//! stdin and sends it to the store's socket (first argument, default
//! `/var/lib/stargz-store/store.sock`).

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;

/// Largest input read from stdin.
const MAX_INPUT: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(stargz_store::daemon::DEFAULT_ROOT).join("store.sock"));
    let mut data = Vec::new();
    std::io::stdin()
        .take(MAX_INPUT)
        .read_to_end(&mut data)
        .context("reading credentials from stdin")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(stargz_store::control::add_credential(&addr, data))
}
