//! Shaped point-to-point links between two fresh network namespaces, for
//! benchmarks: a TUN device in each namespace, a userspace delay line that
//! holds every packet for half the round-trip time in each direction, and a
//! `tbf` qdisc on both TUN devices for the rate. Needs root, `ip` and `tc`;
//! the kernel needs no netem. Addresses exist only inside the namespaces.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors setting a link up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
    #[error("unknown profile {0:?} (lan, wan, slow)")]
    UnknownProfile(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Round-trip time and rate of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    pub rtt: Duration,
    pub rate_mbit: u64,
}

impl Profile {
    /// `lan` 1 ms / 1 Gbit, `wan` 20 ms / 100 Mbit, `slow` 100 ms / 20 Mbit.
    pub fn named(name: &str) -> Result<Profile> {
        let (ms, mbit) = match name {
            "lan" => (1, 1000),
            "wan" => (20, 100),
            "slow" => (100, 20),
            other => return Err(Error::UnknownProfile(other.into())),
        };
        Ok(Profile {
            rtt: Duration::from_millis(ms),
            rate_mbit: mbit,
        })
    }

    /// Seconds to move `bytes` at the link rate (no protocol overhead).
    pub fn transfer_secs(&self, bytes: u64) -> f64 {
        bytes as f64 * 8.0 / (self.rate_mbit as f64 * 1e6)
    }
}

/// Which end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// A live link; torn down (threads stopped, namespaces deleted) on drop.
pub struct Link {
    pub server_ns: String,
    pub client_ns: String,
    pub server_addr: String,
    pub client_addr: String,
    pub profile: Profile,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| Error::Os {
            what: format!("running {}", args[0]),
            source: e,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
// TUNSETIFF is declared as taking an int but reads a whole `struct ifreq` and
// writes the final name back into it.
nix::ioctl_readwrite_bad!(tun_set_iff, TUNSETIFF, [u8; 40]);

/// Opens a TUN device named `name` inside namespace `ns` (from a helper
/// thread that joins the namespace, so the caller's namespace is untouched).
fn open_tun_in(ns: &str, name: &str) -> Result<File> {
    let ns = ns.to_string();
    let name = name.to_string();
    std::thread::spawn(move || -> Result<File> {
        enter_netns(&ns)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| Error::Os {
                what: "/dev/net/tun".into(),
                source: e,
            })?;
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags: libc::c_short = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: `f` is an open /dev/net/tun and `ifr` a live, exclusively borrowed
        // 40-byte buffer laid out as the `struct ifreq` TUNSETIFF reads and writes
        // (name, then flags at 16).
        unsafe { tun_set_iff(f.as_raw_fd(), &mut ifr) }.map_err(|e| Error::Os {
            what: "TUNSETIFF".into(),
            source: e.into(),
        })?;
        Ok(f)
    })
    .join()
    .map_err(|_| Error::Os {
        what: "tun thread".into(),
        source: std::io::Error::other("panicked"),
    })?
}

/// Moves the calling thread into network namespace `ns` (by name, as `ip netns` made it).
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).map_err(|e| Error::Os {
        what: path.clone(),
        source: e,
    })?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Os {
        what: format!("setns {ns}"),
        source: e.into(),
    })
}

fn set_nonblocking(f: &File) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // Best effort, as the delay line copes with blocking reads too.
    if let Ok(fl) = fcntl(f, FcntlArg::F_GETFL) {
        let _ = fcntl(
            f,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK),
        );
    }
}

fn wait_readable(f: &File, ms: u16) -> bool {
    use nix::poll::{poll, PollFd, PollFlags};
    let mut p = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut p, ms), Ok(n) if n > 0)
}

/// One direction: read packets from `from`, hold each for `delay`, write to `to`.
fn delay_line(
    mut from: File,
    mut to: File,
    delay: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let stop_r = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !stop_r.load(Ordering::Relaxed) {
            if !wait_readable(&from, 100) {
                continue;
            }
            loop {
                match from.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ => break,
                }
            }
        }
    });
    let writer = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A full device queue drops the packet, as a real link would.
            let _ = to.write(&pkt);
        }
    });
    vec![reader, writer]
}

impl Link {
    /// Creates namespaces `{prefix}-srv` and `{prefix}-cli` joined by a shaped
    /// link, 10.99.0.1 (server) and 10.99.0.2 (client) on a /30.
    pub fn up(prefix: &str, profile: Profile) -> Result<Link> {
        let server_ns = format!("{prefix}-srv");
        let client_ns = format!("{prefix}-cli");
        for ns in [&server_ns, &client_ns] {
            let _ = run(&["ip", "netns", "del", ns]);
            run(&["ip", "netns", "add", ns])?;
        }
        let mut link = Link {
            server_ns: server_ns.clone(),
            client_ns: client_ns.clone(),
            server_addr: "10.99.0.1".into(),
            client_addr: "10.99.0.2".into(),
            profile,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let tun_s = open_tun_in(&server_ns, "lsh0")?;
        let tun_c = open_tun_in(&client_ns, "lsh0")?;
        let rate = format!("{}mbit", profile.rate_mbit);
        for (ns, addr, peer) in [
            (&server_ns, &link.server_addr, &link.client_addr),
            (&client_ns, &link.client_addr, &link.server_addr),
        ] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                "lsh0",
            ])?;
            run(&[
                "ip",
                "-n",
                ns,
                "link",
                "set",
                "lsh0",
                "up",
                "mtu",
                "1500",
                "txqueuelen",
                "1000",
            ])?;
            let _ = peer;
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lsh0", "root", "tbf",
                "rate", &rate, "burst", "64kb", "latency", "100ms",
            ])?;
        }
        set_nonblocking(&tun_s);
        set_nonblocking(&tun_c);
        let half = profile.rtt / 2;
        let dup = |f: &File| -> Result<File> {
            nix::unistd::dup(f).map(File::from).map_err(|e| Error::Os {
                what: "dup".into(),
                source: e.into(),
            })
        };
        let (s2, c2) = (dup(&tun_s)?, dup(&tun_c)?);
        link.threads
            .extend(delay_line(tun_s, c2, half, link.stop.clone()));
        link.threads
            .extend(delay_line(tun_c, s2, half, link.stop.clone()));
        Ok(link)
    }

    /// Namespace name of a side.
    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Server => &self.server_ns,
            Side::Client => &self.client_ns,
        }
    }

    /// A command that runs `program` inside a side's network namespace. Only the network
    /// namespace changes (`nsenter --net`): `ip netns exec` would also give it a mount
    /// namespace with a fresh /sys without cgroups, where runc cannot start containers
    /// and whose mounts the rest of the machine does not see.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{}", self.ns(side)))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = run(&["ip", "netns", "del", &self.server_ns]);
        let _ = run(&["ip", "netns", "del", &self.client_ns]);
    }
}
