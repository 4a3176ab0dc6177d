//! The image corpus: recipes (Debian package sets layered on a debootstrap base, plus
//! a tiny busybox image for smoke runs), building each stage offline with overlayfs so
//! the upper directory is the layer diff, and writing one OCI layout per image. Stages
//! are cached under a directory named by the hash of their recipe.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::sys::stat::{mknod, Mode, SFlag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Debian archive used by debootstrap and apt inside the stages.
pub const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
/// Bumped whenever the way a stage is built changes, so caches are rebuilt.
const RECIPE_VERSION: &str = "hellobench-corpus-2";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a container runs and the output line that means it is done (or ready).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workload {
    pub args: Vec<String>,
    pub expect: String,
    /// A server: stopped once the line is seen.
    pub server: bool,
}

/// How one layer comes about.
#[derive(Clone, Debug)]
pub enum Stage {
    /// `debootstrap --variant=minbase`.
    Debootstrap,
    /// `apt-get install --no-install-recommends` of these packages on the previous stages.
    Apt(Vec<&'static str>),
    /// Files written directly (the busybox smoke image): (path, contents) and paths to delete.
    Busybox { delete: Vec<&'static str> },
}

/// An image: its layers, bottom first, and its workload.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub name: &'static str,
    pub stages: Vec<Stage>,
    pub workload: Workload,
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn wl(args: Vec<String>, expect: &str, server: bool) -> Workload {
    Workload {
        args,
        expect: expect.into(),
        server,
    }
}

/// Every image the benchmark knows, by name.
pub fn recipes() -> Vec<Recipe> {
    let deb = |pk: Vec<&'static str>| vec![Stage::Debootstrap, Stage::Apt(pk)];
    vec![
        Recipe {
            name: "busybox",
            stages: vec![
                Stage::Busybox { delete: vec![] },
                Stage::Busybox {
                    delete: vec!["etc/old-motd"],
                },
            ],
            workload: wl(vec!["/bin/busybox".into(), "cat".into(), "/etc/hello".into()], "hello", false),
        },
        Recipe {
            name: "debian",
            stages: vec![Stage::Debootstrap],
            workload: wl(vec!["/bin/echo".into(), "hello".into()], "hello", false),
        },
        Recipe {
            name: "python",
            stages: deb(vec!["python3"]),
            workload: wl(
                vec!["/usr/bin/python3".into(), "-c".into(), "print(\"hello\")".into()],
                "hello",
                false,
            ),
        },
        Recipe {
            name: "node",
            stages: deb(vec!["nodejs"]),
            workload: wl(
                vec!["/usr/bin/node".into(), "-e".into(), "console.log(\"hello\")".into()],
                "hello",
                false,
            ),
        },
        Recipe {
            name: "gcc",
            stages: deb(vec!["gcc", "libc6-dev"]),
            workload: wl(
                sh("printf '#include <stdio.h>\\nint main(void){puts(\"hello\");return 0;}\\n' > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h"),
                "hello",
                false,
            ),
        },
        Recipe {
            name: "golang",
            stages: deb(vec!["golang-go"]),
            workload: wl(
                sh("mkdir -p /tmp/h && cd /tmp/h && printf 'package main\\nimport \"fmt\"\\nfunc main() { fmt.Println(\"hello\") }\\n' > h.go && HOME=/tmp GOCACHE=/tmp/gocache GO111MODULE=off go run h.go"),
                "hello",
                false,
            ),
        },
        Recipe {
            name: "java",
            stages: deb(vec!["default-jre-headless"]),
            workload: wl(vec!["/usr/bin/java".into(), "-version".into()], "openjdk version", false),
        },
        Recipe {
            name: "postgres",
            stages: deb(vec!["postgresql"]),
            workload: wl(
                sh("mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql && exec su postgres -s /bin/sh -c 'exec /usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main -c config_file=/etc/postgresql/15/main/postgresql.conf -c ssl=off'"),
                "ready to accept connections",
                true,
            ),
        },
        Recipe {
            name: "redis",
            stages: deb(vec!["redis-server"]),
            workload: wl(
                vec![
                    "/usr/bin/redis-server".into(),
                    "--save".into(),
                    "".into(),
                    "--appendonly".into(),
                    "no".into(),
                ],
                "Ready to accept connections",
                true,
            ),
        },
    ]
}

pub fn recipe(name: &str) -> Result<Recipe> {
    recipes()
        .into_iter()
        .find(|r| r.name == name)
        .with_context(|| format!("unknown image {name:?}"))
}

/// A built layer: compressed blob and its digests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Layer {
    pub blob: PathBuf,
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
}

/// A built image: an OCI layout with tag `latest`.
#[derive(Clone, Debug)]
pub struct Built {
    pub name: String,
    pub layout: PathBuf,
    pub workload: Workload,
}

fn run(cmd: &mut Command) -> Result<()> {
    let dbg = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {dbg}"))?;
    if !out.status.success() {
        bail!(
            "{dbg} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn stage_key(parent: &str, stage: &Stage) -> String {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION);
    h.update(parent);
    h.update(format!("{stage:?}"));
    if matches!(stage, Stage::Debootstrap | Stage::Apt(_)) {
        h.update(MIRROR);
        h.update(SUITE);
    }
    hex::encode(&h.finalize()[..8])
}

/// Builds (or finds cached) every stage of `recipe` and its OCI layout under `cache`.
pub fn build(cache: &Path, recipe: &Recipe) -> Result<Built> {
    fs::create_dir_all(cache)?;
    let mut parent = String::new();
    let mut uppers: Vec<PathBuf> = Vec::new();
    let mut layers = Vec::new();
    for stage in &recipe.stages {
        let key = format!("{}-{}", stage_label(stage), stage_key(&parent, stage));
        let dir = cache.join("stages").join(&key);
        let meta = dir.join("layer.json");
        if !meta.exists() {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            tracing::info!(image = recipe.name, stage = %key, "building stage");
            build_stage(&dir, stage, &uppers)
                .with_context(|| format!("building stage {key} of {}", recipe.name))?;
            let layer = write_layer(&dir.join("upper"), &dir.join("layer.tar.gz"))?;
            fs::write(&meta, serde_json::to_vec_pretty(&layer)?)?;
        }
        let mut layer: Layer = serde_json::from_slice(&fs::read(&meta)?)?;
        layer.blob = dir.join("layer.tar.gz");
        layers.push(layer);
        uppers.push(dir.join("upper"));
        parent = key;
    }
    let layout = cache
        .join("images")
        .join(format!("{}-{parent}", recipe.name));
    if !layout.join("index.json").exists() {
        let _ = fs::remove_dir_all(&layout);
        write_layout(&layout, &layers, &recipe.workload)?;
    }
    Ok(Built {
        name: recipe.name.into(),
        layout,
        workload: recipe.workload.clone(),
    })
}

fn stage_label(s: &Stage) -> String {
    match s {
        Stage::Debootstrap => "base".into(),
        Stage::Apt(p) => p.join("+"),
        Stage::Busybox { .. } => "busybox".into(),
    }
}

struct Mounted(Vec<PathBuf>);
impl Drop for Mounted {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn build_stage(dir: &Path, stage: &Stage, lowers: &[PathBuf]) -> Result<()> {
    let upper = dir.join("upper");
    match stage {
        Stage::Debootstrap => {
            run(Command::new("debootstrap")
                .args(["--variant=minbase", SUITE])
                .arg(&upper)
                .arg(MIRROR))?;
            // debootstrap leaves its downloads and the package lists behind.
            for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
                for e in fs::read_dir(upper.join(d))? {
                    let e = e?;
                    if e.file_type()?.is_file() && e.file_name() != "lock" {
                        fs::remove_file(e.path())?;
                    }
                }
            }
            // ctr provides no /etc/hosts; servers resolve localhost through it.
            fs::write(
                upper.join("etc/hosts"),
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            )?;
        }
        Stage::Busybox { delete } => {
            fs::create_dir_all(upper.join("bin"))?;
            fs::create_dir_all(upper.join("etc"))?;
            if lowers.is_empty() {
                fs::copy("/bin/busybox", upper.join("bin/busybox"))
                    .context("copying /bin/busybox (busybox-static)")?;
                std::os::unix::fs::symlink("busybox", upper.join("bin/sh"))?;
                fs::write(upper.join("etc/old-motd"), "replaced in the next layer\n")?;
            } else {
                fs::write(upper.join("etc/hello"), "hello\n")?;
            }
            for d in delete {
                let p = upper.join(d);
                // A 0/0 character device is overlayfs's whiteout, turned into
                // `.wh.` by write_layer.
                mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(std::io::Error::from)
                    .context("mknod whiteout")?;
            }
        }
        Stage::Apt(pkgs) => {
            let work = dir.join("work");
            let merged = dir.join("merged");
            for d in [&upper, &work, &merged] {
                fs::create_dir_all(d)?;
            }
            let lowerdir = lowers
                .iter()
                .rev()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":");
            let mut mounts = Mounted(Vec::new());
            run(Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={lowerdir},upperdir={},workdir={}",
                    upper.display(),
                    work.display()
                ))
                .arg(&merged))?;
            mounts.0.push(merged.clone());
            run(Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(merged.join("proc")))?;
            mounts.0.push(merged.join("proc"));
            let policy = merged.join("usr/sbin/policy-rc.d");
            fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
            run(Command::new("chmod").arg("0755").arg(&policy))?;
            let resolv = merged.join("etc/resolv.conf");
            let _ = fs::remove_file(&resolv);
            fs::copy("/etc/resolv.conf", &resolv).context("copying /etc/resolv.conf")?;
            let script = format!(
                "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; \
                 apt-get install -y -qq --no-install-recommends {}; apt-get clean; \
                 rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/info/*",
                pkgs.join(" ")
            );
            run(Command::new("chroot")
                .arg(&merged)
                .args(["/bin/sh", "-c", &script])
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("LC_ALL", "C"))?;
            fs::remove_file(&policy)?;
            drop(mounts);
            let _ = fs::remove_dir_all(&work);
            let _ = fs::remove_dir(&merged);
        }
    }
    Ok(())
}

/// Paths a runtime provides or that must not ship in a layer.
fn excluded(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    matches!(
        s.as_ref(),
        "etc/hostname" | "etc/resolv.conf" | "usr/sbin/policy-rc.d"
    ) || ["dev/", "proc/", "sys/", "run/", "tmp/"]
        .iter()
        .any(|p| s.starts_with(p))
}

fn opaque(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: `c` and the name are NUL-terminated strings that outlive the call and
    // `buf` is a live buffer passed with its own length; nix has no xattr calls.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// Tars an overlay upper directory (whiteouts as `.wh.` entries, opaque
/// directories with `.wh..wh..opq`), gzips it and returns its digests.
pub fn write_layer(upper: &Path, out: &Path) -> Result<Layer> {
    struct Hashing<W: Write> {
        inner: W,
        hash: Sha256,
        n: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(b)?;
            self.hash.update(&b[..n]);
            self.n += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let file = fs::File::create(out)?;
    let compressed = Hashing {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
        n: 0,
    };
    let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::new(6));
    let raw = Hashing {
        inner: gz,
        hash: Sha256::new(),
        n: 0,
    };
    let mut tb = tar::Builder::new(raw);
    tb.follow_symlinks(false);
    let mut hardlinks: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = upper.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .with_context(|| format!("reading {}", abs.display()))?
            .collect::<std::io::Result<Vec<_>>>()?;
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let r = rel.join(e.file_name());
            if excluded(&r) {
                continue;
            }
            let p = e.path();
            let md = fs::symlink_metadata(&p)?;
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                let wh = rel.join(format!(".wh.{}", e.file_name().to_string_lossy()));
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(0);
                h.set_mode(0o644);
                h.set_mtime(md.mtime().max(0) as u64);
                tb.append_data(&mut h, &wh, std::io::empty())?;
                continue;
            }
            if ft.is_file() && md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = hardlinks.get(&key) {
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata(&md);
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    tb.append_link(&mut h, &r, first)?;
                    continue;
                }
                hardlinks.insert(key, r.clone());
            }
            if ft.is_socket() {
                continue;
            }
            tb.append_path_with_name(&p, &r)
                .with_context(|| format!("adding {}", p.display()))?;
            if ft.is_dir() {
                if opaque(&p) {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(0);
                    h.set_mode(0o644);
                    tb.append_data(&mut h, r.join(".wh..wh..opq"), std::io::empty())?;
                }
                subdirs.push(r);
            }
        }
        // Depth-first in name order: push in reverse so the first name is popped first.
        stack.extend(subdirs.into_iter().rev());
    }
    let raw = tb.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(raw.hash.finalize()));
    let mut compressed = raw.inner.finish()?;
    compressed.flush()?;
    Ok(Layer {
        blob: out.to_path_buf(),
        digest: format!("sha256:{}", hex::encode(compressed.hash.finalize())),
        diff_id,
        size: compressed.n,
    })
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

fn write_layout(layout: &Path, layers: &[Layer], workload: &Workload) -> Result<()> {
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    for l in layers {
        let dst = layout
            .join("blobs/sha256")
            .join(l.digest.trim_start_matches("sha256:"));
        if fs::hard_link(&l.blob, &dst).is_err() {
            fs::copy(&l.blob, &dst)?;
        }
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": workload.args, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
    });
    let (cd, cs) = put_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let (md, ms) = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// An overlay upper dir as the kernel leaves it: a 0/0 character device for a
    /// deleted file and the opaque xattr on a replaced directory.
    #[test]
    fn upper_dir_whiteouts_become_wh_entries() {
        if !is_root() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("needs root (mknod, trusted.* xattrs)");
            }
            eprintln!("!!!!!!!! SKIPPING: needs root (mknod, trusted.* xattrs) !!!!!!!!");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("etc/replaced")).unwrap();
        fs::create_dir_all(upper.join("proc/self")).unwrap();
        fs::write(upper.join("etc/new"), "new\n").unwrap();
        fs::write(upper.join("etc/resolv.conf"), "nameserver 1.1.1.1\n").unwrap();
        fs::write(upper.join("etc/replaced/kept"), "x").unwrap();
        // A 0/0 character device: overlay's whiteout.
        mknod(&upper.join("etc/gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        let dir = std::ffi::CString::new(
            upper
                .join("etc/replaced")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: valid C strings and a one-byte value.
        let rc = unsafe {
            libc::lsetxattr(
                dir.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let layer = write_layer(&upper, &tmp.path().join("layer.tar.gz")).unwrap();
        assert!(layer.digest.starts_with("sha256:") && layer.diff_id.starts_with("sha256:"));
        assert_eq!(layer.size, fs::metadata(&layer.blob).unwrap().len());

        let gz = flate2::read::GzDecoder::new(fs::File::open(&layer.blob).unwrap());
        let mut names = Vec::new();
        let mut raw_hash = Sha256::new();
        let mut ar = tar::Archive::new(gz);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push(e.path().unwrap().display().to_string());
        }
        for want in [
            "etc",
            "etc/new",
            "etc/.wh.gone",
            "etc/replaced",
            "etc/replaced/.wh..wh..opq",
            "etc/replaced/kept",
            "proc",
        ] {
            assert!(
                names.contains(&want.to_string()),
                "{want} missing from {names:?}"
            );
        }
        for unwanted in ["etc/gone", "etc/resolv.conf", "proc/self"] {
            assert!(
                !names.contains(&unwanted.to_string()),
                "{unwanted} in {names:?}"
            );
        }
        // Parents come before their children.
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("etc") < pos("etc/new") && pos("etc/replaced") < pos("etc/replaced/kept"));
        // diff_id is the digest of the uncompressed tar.
        let mut gz = flate2::read::GzDecoder::new(fs::File::open(&layer.blob).unwrap());
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut gz, &mut raw).unwrap();
        raw_hash.update(&raw);
        assert_eq!(
            layer.diff_id,
            format!("sha256:{}", hex::encode(raw_hash.finalize()))
        );
    }
}
