//! The parts of an OCI image config that say which process a container starts:
//! `config.Entrypoint` + `config.Cmd`, `config.Env` (PATH, LD_LIBRARY_PATH) and
//! `config.WorkingDir`. The JSON comes from the registry: it is bounded before it is
//! fetched ([`MAX_CONFIG_BYTES`]), and so is what is kept of it.

use serde::Deserialize;

/// Largest image config fetched (real ones are a few KiB, history included).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Most arguments kept, and the longest one.
const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;

/// The start of a container's process as the image describes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Process {
    /// Entrypoint followed by Cmd.
    pub argv: Vec<String>,
    pub path: Option<String>,
    pub ld_library_path: Option<String>,
    /// Working directory, `/` when unset.
    pub cwd: String,
}

#[derive(Deserialize, Default)]
struct ImageConfig {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

/// The process of the config JSON `data`; `None` if it is not one.
pub fn parse(data: &[u8]) -> Option<Process> {
    if data.len() as u64 > MAX_CONFIG_BYTES {
        return None;
    }
    let cfg: ImageConfig = serde_json::from_slice(data).ok()?;
    let c = cfg.config.unwrap_or_default();
    let argv: Vec<String> = c
        .entrypoint
        .unwrap_or_default()
        .into_iter()
        .chain(c.cmd.unwrap_or_default())
        .take(MAX_ARGS)
        .filter(|a| a.len() <= MAX_ARG)
        .collect();
    let var = |name: &str| {
        c.env.as_ref().and_then(|env| {
            env.iter()
                .filter_map(|e| e.strip_prefix(name)?.strip_prefix('='))
                .rfind(|v| v.len() <= MAX_ARG)
                .map(str::to_string)
        })
    };
    let cwd = c
        .working_dir
        .filter(|d| d.starts_with('/') && d.len() <= MAX_ARG)
        .unwrap_or_else(|| "/".to_string());
    Some(Process {
        path: var("PATH"),
        ld_library_path: var("LD_LIBRARY_PATH"),
        argv,
        cwd,
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is a failed assertion"
    )]

    use super::*;

    #[test]
    fn entrypoint_then_cmd_and_env() {
        let p = parse(
            br#"{"architecture":"amd64","config":{"Entrypoint":["python3"],"Cmd":["app.py"],
            "Env":["A=1","PATH=/opt/bin:/usr/bin"],"WorkingDir":"/srv"}}"#,
        )
        .unwrap();
        assert_eq!(p.argv, vec!["python3", "app.py"]);
        assert_eq!(p.path.as_deref(), Some("/opt/bin:/usr/bin"));
        assert_eq!(p.cwd, "/srv");
        let p = parse(br#"{"config":{"Entrypoint":null,"Cmd":["ls"]}}"#).unwrap();
        assert_eq!(p.argv, vec!["ls"]);
        assert_eq!(p.path, None);
        assert_eq!(p.cwd, "/");
        assert_eq!(parse(br#"{}"#).unwrap().argv, Vec::<String>::new());
        assert_eq!(parse(b"[1,2"), None);
        assert_eq!(parse(br#"{"config":{"Cmd":"ls"}}"#), None);
    }
}
