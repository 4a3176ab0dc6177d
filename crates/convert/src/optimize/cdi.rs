//! GPUs for the workload through the Container Device Interface: CDI specs
//! (JSON or YAML) are read from the spec directories, the requested devices of
//! a kind looked up by name, and the spec-level and device-level
//! `containerEdits` applied to the runtime spec (environment, device nodes with
//! their cgroup access, mounts, hooks, additional groups).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    HookBuilder, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, MountBuilder, Spec,
};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The kind `--gpus` selects devices of.
pub const GPU_KIND: &str = "nvidia.com/gpu";
/// The standard spec directories, lowest priority first.
pub const DEFAULT_SPEC_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];
/// Colon-separated spec directories replacing the standard ones (lowest
/// priority first).
pub const SPEC_DIRS_ENV: &str = "CDI_SPEC_DIRS";

/// The spec directories: `$CDI_SPEC_DIRS` when set, else the standard ones.
pub fn spec_dirs() -> Vec<PathBuf> {
    match std::env::var_os(SPEC_DIRS_ENV) {
        Some(v) if !v.is_empty() => std::env::split_paths(&v)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        _ => DEFAULT_SPEC_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// One CDI spec file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    #[serde(default)]
    pub cdi_version: String,
    pub kind: String,
    #[serde(default)]
    pub devices: Vec<CdiDevice>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDevice {
    pub name: String,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

/// Changes a spec or a device asks of the container.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    pub hooks: Vec<CdiHook>,
    #[serde(default)]
    pub mounts: Vec<CdiMount>,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// Not applied (runc's RDT support is outside what optimize needs); warned about.
    #[serde(default)]
    pub intel_rdt: Option<serde_json::Value>,
    /// Not applied; warned about.
    #[serde(default)]
    pub net_devices: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
    pub host_path: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub file_mode: Option<u32>,
    pub permissions: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiHook {
    pub hook_name: String,
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    pub timeout: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiMount {
    pub host_path: String,
    pub container_path: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl ContainerEdits {
    fn append(&mut self, o: &ContainerEdits) {
        self.env.extend(o.env.iter().cloned());
        self.device_nodes.extend(o.device_nodes.iter().cloned());
        self.hooks.extend(o.hooks.iter().cloned());
        self.mounts.extend(o.mounts.iter().cloned());
        self.additional_gids
            .extend(o.additional_gids.iter().copied());
        if o.intel_rdt.is_some() {
            self.intel_rdt.clone_from(&o.intel_rdt);
        }
        self.net_devices.extend(o.net_devices.iter().cloned());
    }
}

/// A spec file and where it came from.
#[derive(Clone, Debug)]
struct Loaded {
    file: PathBuf,
    spec: CdiSpec,
}

/// Reads every `*.json`, `*.yaml` and `*.yml` spec of `dirs`, highest priority
/// (the last directory) first; unreadable files are returned as messages.
fn load_specs(dirs: &[PathBuf]) -> (Vec<Loaded>, Vec<String>) {
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    for dir in dirs.iter().rev() {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "json" | "yaml" | "yml"))
            })
            .collect();
        files.sort();
        for file in files {
            match parse_file(&file) {
                Ok(spec) => specs.push(Loaded { file, spec }),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "skipping a CDI spec");
                    problems.push(format!("{}: {e}", file.display()));
                }
            }
        }
    }
    (specs, problems)
}

fn parse_file(file: &Path) -> std::result::Result<CdiSpec, String> {
    let text = std::fs::read(file).map_err(|e| e.to_string())?;
    let is_json = file.extension().is_some_and(|x| x == "json");
    if is_json {
        serde_json::from_slice(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_slice(&text).map_err(|e| e.to_string())
    }
}

/// The edits for devices `names` of `kind`: each used spec's own edits once,
/// then each device's, in the order asked.
pub fn resolve(kind: &str, names: &[String], dirs: &[PathBuf]) -> Result<ContainerEdits> {
    let (specs, problems) = load_specs(dirs);
    let where_ = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let of_kind: Vec<&Loaded> = specs.iter().filter(|l| l.spec.kind == kind).collect();
    let unreadable = if problems.is_empty() {
        String::new()
    } else {
        format!("; unreadable specs: {}", problems.join("; "))
    };
    if of_kind.is_empty() {
        return Err(Error::Cdi(format!(
            "no CDI spec of kind {kind} in {where_} (${SPEC_DIRS_ENV} replaces these directories){unreadable}"
        )));
    }
    let mut edits = ContainerEdits::default();
    let mut used_specs: Vec<&Path> = Vec::new();
    for name in names {
        let found = of_kind.iter().find_map(|l| {
            l.spec
                .devices
                .iter()
                .find(|d| &d.name == name)
                .map(|d| (*l, d))
        });
        let Some((loaded, device)) = found else {
            let mut known: Vec<&str> = of_kind
                .iter()
                .flat_map(|l| l.spec.devices.iter().map(|d| d.name.as_str()))
                .collect();
            known.sort_unstable();
            known.dedup();
            return Err(Error::Cdi(format!(
                "no CDI device {kind}={name} in {where_} (devices of that kind: {}){unreadable}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        if !used_specs.contains(&loaded.file.as_path()) {
            used_specs.push(&loaded.file);
            edits.append(&loaded.spec.container_edits);
        }
        edits.append(&device.container_edits);
        tracing::info!(device = %format!("{kind}={name}"), spec = %loaded.file.display(), version = %loaded.spec.cdi_version, "CDI device");
    }
    Ok(edits)
}

/// Applies `edits` to the runtime spec.
pub fn apply(edits: &ContainerEdits, spec: &mut Spec) -> Result<()> {
    let spec_err = |e: oci_spec::OciSpecError| Error::Cdi(format!("runtime spec: {e}"));
    if edits.intel_rdt.is_some() || !edits.net_devices.is_empty() {
        tracing::warn!("the CDI spec's intelRdt and netDevices edits are not applied");
    }

    if let Some(process) = spec.process_mut() {
        let mut env = process.env().clone().unwrap_or_default();
        for e in &edits.env {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            env.retain(|x| x.split_once('=').map_or(x.as_str(), |(k, _)| k) != key);
            env.push(e.clone());
        }
        process.set_env(Some(env));
        if !edits.additional_gids.is_empty() {
            let user = process.user_mut();
            let mut gids = user.additional_gids().clone().unwrap_or_default();
            for g in &edits.additional_gids {
                if !gids.contains(g) {
                    gids.push(*g);
                }
            }
            user.set_additional_gids(Some(gids));
        }
    }

    let mut devices = Vec::new();
    let mut rules = Vec::new();
    for node in &edits.device_nodes {
        let host = node.host_path.as_deref().unwrap_or(&node.path);
        let meta = std::fs::metadata(host).map_err(|e| {
            Error::Cdi(format!(
                "device node {} (host {host}) of the CDI spec: {e}",
                node.path
            ))
        })?;
        let ft = meta.file_type();
        let kind = match node.kind.as_deref() {
            Some(t) => serde_json::from_value::<LinuxDeviceType>(serde_json::Value::from(t))
                .map_err(|_| Error::Cdi(format!("device node {}: bad type {t:?}", node.path)))?,
            None if ft.is_char_device() => LinuxDeviceType::C,
            None if ft.is_block_device() => LinuxDeviceType::B,
            None if ft.is_fifo() => LinuxDeviceType::P,
            None => {
                return Err(Error::Cdi(format!(
                    "device node {}: host {host} is not a device",
                    node.path
                )))
            }
        };
        let rdev = meta.rdev();
        let major = node.major.unwrap_or(nix::sys::stat::major(rdev) as i64);
        let minor = node.minor.unwrap_or(nix::sys::stat::minor(rdev) as i64);
        let mut b = LinuxDeviceBuilder::default()
            .path(&node.path)
            .typ(kind)
            .major(major)
            .minor(minor)
            .file_mode(node.file_mode.unwrap_or(meta.mode() & 0o7777));
        if let Some(u) = node.uid {
            b = b.uid(u);
        }
        if let Some(g) = node.gid {
            b = b.gid(g);
        }
        devices.push(b.build().map_err(spec_err)?);
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(kind)
                .major(major)
                .minor(minor)
                .access(node.permissions.clone().unwrap_or_else(|| "rwm".into()))
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(linux) = spec.linux_mut() {
        let mut all = linux.devices().clone().unwrap_or_default();
        for d in devices {
            all.retain(|x| x.path() != d.path());
            all.push(d);
        }
        linux.set_devices(Some(all));
        let mut resources = linux.resources().clone().unwrap_or_default();
        let mut allow = resources.devices().clone().unwrap_or_default();
        allow.extend(rules);
        resources.set_devices(Some(allow));
        linux.set_resources(Some(resources));
    }

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for m in &edits.mounts {
        let kind = m.kind.clone().unwrap_or_else(|| "bind".into());
        let mut options = m.options.clone();
        if kind == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.push("rbind".into());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&m.container_path)
                .source(&m.host_path)
                .typ(kind)
                .options(options)
                .build()
                .map_err(spec_err)?,
        );
    }
    spec.set_mounts(Some(mounts));

    if !edits.hooks.is_empty() {
        let mut hooks = spec.hooks().clone().unwrap_or_default();
        for h in &edits.hooks {
            let mut b = HookBuilder::default().path(&h.path);
            if !h.args.is_empty() {
                b = b.args(h.args.clone());
            }
            if !h.env.is_empty() {
                b = b.env(h.env.clone());
            }
            if let Some(t) = h.timeout {
                b = b.timeout(t);
            }
            let hook = b.build().map_err(spec_err)?;
            let push = |list: Option<Vec<oci_spec::runtime::Hook>>| {
                let mut l = list.unwrap_or_default();
                l.push(hook.clone());
                Some(l)
            };
            match h.hook_name.as_str() {
                #[allow(deprecated)]
                "prestart" => hooks.set_prestart(push(hooks.prestart().clone())),
                "createRuntime" => hooks.set_create_runtime(push(hooks.create_runtime().clone())),
                "createContainer" => {
                    hooks.set_create_container(push(hooks.create_container().clone()))
                }
                "startContainer" => {
                    hooks.set_start_container(push(hooks.start_container().clone()))
                }
                "poststart" => hooks.set_poststart(push(hooks.poststart().clone())),
                "poststop" => hooks.set_poststop(push(hooks.poststop().clone())),
                other => {
                    return Err(Error::Cdi(format!(
                        "hook {}: unknown hookName {other:?}",
                        h.path
                    )))
                }
            };
        }
        spec.set_hooks(Some(hooks));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
cdiVersion: "0.6.0"
kind: nvidia.com/gpu
containerEdits:
  env: ["SHARED=1"]
  hooks:
    - hookName: createContainer
      path: /bin/true
      args: ["true", "hook"]
devices:
  - name: "0"
    containerEdits:
      env: ["GPU=zero"]
      deviceNodes:
        - path: /dev/fakegpu0
          hostPath: /dev/null
      mounts:
        - hostPath: /etc/hostname
          containerPath: /run/gpu-info
          options: [ro]
"#;

    #[test]
    fn resolves_and_applies_devices() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("gpu.yaml"), YAML).unwrap();
        std::fs::write(
            d.path().join("other.json"),
            r#"{"kind":"x.com/y","devices":[]}"#,
        )
        .unwrap();
        let dirs = vec![d.path().to_path_buf()];
        let edits = resolve(GPU_KIND, &["0".into()], &dirs).unwrap();
        assert_eq!(edits.env, vec!["SHARED=1", "GPU=zero"]);

        let mut spec = Spec::default();
        apply(&edits, &mut spec).unwrap();
        let env = spec.process().as_ref().unwrap().env().clone().unwrap();
        assert!(env.contains(&"GPU=zero".to_string()), "{env:?}");
        let linux = spec.linux().as_ref().unwrap();
        let dev = linux
            .devices()
            .as_ref()
            .unwrap()
            .iter()
            .find(|d| d.path() == Path::new("/dev/fakegpu0"))
            .unwrap();
        assert_eq!(
            (dev.typ(), dev.major(), dev.minor()),
            (LinuxDeviceType::C, 1, 3)
        );
        let rules = linux
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .clone()
            .unwrap();
        assert!(rules
            .iter()
            .any(|r| r.allow() && r.major() == Some(1) && r.minor() == Some(3)));
        assert!(spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/run/gpu-info")));
        let hooks = spec
            .hooks()
            .as_ref()
            .unwrap()
            .create_container()
            .clone()
            .unwrap();
        assert_eq!(hooks[0].path(), Path::new("/bin/true"));
    }

    #[test]
    fn missing_devices_and_specs_are_named() {
        let d = tempfile::tempdir().unwrap();
        let dirs = vec![d.path().to_path_buf()];
        let e = resolve(GPU_KIND, &["0".into()], &dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CDI spec of kind nvidia.com/gpu"), "{e}");
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        std::fs::write(d.path().join("gpu.yaml"), YAML).unwrap();
        let e = resolve(GPU_KIND, &["1".into()], &dirs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CDI device nvidia.com/gpu=1"), "{e}");
        assert!(e.contains("devices of that kind: 0"), "{e}");
    }
}
