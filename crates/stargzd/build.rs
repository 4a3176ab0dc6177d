//! Build script: the git revision `--version` prints after the version, as the
//! reference does; `STARGZ_REVISION` (packaging) wins over git, `<unknown>` without both.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=STARGZ_REVISION");
    let given = std::env::var("STARGZ_REVISION")
        .ok()
        .filter(|s| !s.is_empty());
    let rev = given.or_else(|| {
        // Rebuilt when HEAD moves: HEAD itself and the branch it points to.
        for name in ["HEAD".to_string()]
            .into_iter()
            .chain(git(&["symbolic-ref", "-q", "HEAD"]))
        {
            if let Some(p) = git(&["rev-parse", "--git-path", &name]) {
                if Path::new(&p).exists() {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
        }
        git(&["rev-parse", "HEAD"])
    });
    let rev = rev.unwrap_or_else(|| "<unknown>".to_string());
    println!("cargo:rustc-env=STARGZ_REVISION={rev}");
}
