//! Pod IPs on this machine: [`POD_CIDR`] routed to the loopback device, one address per pod,
//! leased with a lock file so that concurrently running test binaries never share one.
//!
//! Loopback addresses (127.0.0.0/8) will not do: the API server rejects them in Endpoints and
//! EndpointSlices. A private range made local to this machine is accepted there and reachable
//! here, like pod IPs on a node.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The pod runner's pod IPs (kwok gives its own pods 10.244.0.0/16).
pub const POD_CIDR: &str = "10.246.0.0/16";
const FIRST_OCTETS: [u8; 2] = [10, 246];
/// Hosts .1 to .254 of the subnets .1 to .254.
const HOSTS: u32 = 254 * 254;

/// Why pods cannot get addresses here.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "the pod runner needs {POD_CIDR} routed to the loopback device (`ip route add local \
         {POD_CIDR} dev lo`, which needs root or CAP_NET_ADMIN): {0}"
    )]
    NoRoute(String),
    #[error("cannot lease a pod IP: {0}")]
    Lease(std::io::Error),
    #[error("no free pod IP in {POD_CIDR}")]
    Exhausted,
}

/// Makes sure [`POD_CIDR`] is local to this machine: adds the route once if it is missing (it
/// is left in place, since other test binaries may be using it), then checks that an address
/// of the range accepts a connection.
pub fn ensure_local_route() -> Result<(), NetworkError> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            if !route_present()? {
                add_route()?;
            }
            check_reachable()
        })
        .clone()
        .map_err(NetworkError::NoRoute)
}

fn route_present() -> Result<bool, String> {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "table", "local"])
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .any(|l| l.starts_with(&format!("local {POD_CIDR} "))))
}

fn add_route() -> Result<(), String> {
    let out = Command::new("ip")
        .args(["route", "add", "local", POD_CIDR, "dev", "lo"])
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Another test binary may have added it a moment ago.
    if out.status.success() || stderr.contains("File exists") {
        Ok(())
    } else {
        Err(format!("`ip route add` failed: {}", stderr.trim()))
    }
}

fn check_reachable() -> Result<(), String> {
    let probe = Ipv4Addr::new(FIRST_OCTETS[0], FIRST_OCTETS[1], 0, 1);
    let listener = TcpListener::bind((probe, 0)).map_err(|e| format!("bind {probe}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("bind {probe}: {e}"))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(|_| ())
        .map_err(|e| format!("connect {addr}: {e}"))
}

/// A pod IP held by this process until dropped.
#[derive(Debug)]
pub struct IpLease {
    ip: Ipv4Addr,
    /// `<temp>/llama-pod-runner-ips/<ip>`, removed when the lease ends.
    path: PathBuf,
    // The lock on `path`; the kernel releases it if the process dies.
    _lock: File,
}

impl Drop for IpLease {
    fn drop(&mut self) {
        // Removed while still locked: whoever opened it meanwhile finds, once it has the lock,
        // that the path no longer names its file (see `acquire`), and moves on.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl IpLease {
    /// Leases a free address on which `port` can be bound.
    pub fn acquire(port: u16) -> Result<Self, NetworkError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = lock_dir();
        std::fs::create_dir_all(&dir).map_err(NetworkError::Lease)?;
        // Start each process at a different place, so binaries rarely contend for a lock.
        let start = std::process::id().wrapping_mul(2_654_435_761) % HOSTS;
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % HOSTS;
        for attempt in 0..HOSTS {
            let ip = host((start + offset + attempt) % HOSTS);
            let path = dir.join(ip.to_string());
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(NetworkError::Lease)?;
            if !try_lock(&file) || !still_named(&file, &path) {
                continue;
            }
            // Something outside the runner may hold the address; skip it then (the file stays:
            // removing it is only safe for the holder of a lease).
            if TcpListener::bind(SocketAddr::from((ip, port))).is_ok() {
                return Ok(Self {
                    ip,
                    path,
                    _lock: file,
                });
            }
        }
        Err(NetworkError::Exhausted)
    }

    /// The address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("llama-pod-runner-ips")
}

fn host(index: u32) -> Ipv4Addr {
    let (subnet, host) = (index / 254, index % 254);
    let octet = |n: u32| u8::try_from(n + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(FIRST_OCTETS[0], FIRST_OCTETS[1], octet(subnet), octet(host))
}

/// Whether `path` still names the open `file` (a lease that ended removes its file).
fn still_named(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
        _ => false,
    }
}

#[allow(unsafe_code)]
fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function borrows; it touches no memory.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_cover_the_range_without_network_or_broadcast_addresses() {
        assert_eq!(host(0), Ipv4Addr::new(10, 246, 1, 1));
        assert_eq!(host(253), Ipv4Addr::new(10, 246, 1, 254));
        assert_eq!(host(254), Ipv4Addr::new(10, 246, 2, 1));
        assert_eq!(host(HOSTS - 1), Ipv4Addr::new(10, 246, 254, 254));
    }

    #[test]
    fn a_locked_file_is_not_locked_twice_and_a_removed_one_is_noticed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("10.246.1.1");
        let open = || {
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .expect("open")
        };
        let first = open();
        assert!(try_lock(&first) && still_named(&first, &path));
        let waiting = open();
        assert!(
            !try_lock(&waiting),
            "a second open file description must not get the lock"
        );
        // The lease ends: its file is removed, then unlocked.
        std::fs::remove_file(&path).expect("remove");
        drop(first);
        assert!(try_lock(&waiting), "the old file's lock is free");
        assert!(
            !still_named(&waiting, &path),
            "but it is no longer the lease file"
        );
        let next = open();
        assert!(try_lock(&next) && still_named(&next, &path));
    }
}
