//! An agent host for the live tests: a network namespace joined to this host by one veth pair,
//! so what runs in it reaches the stack only by the address agents are given.
//!
//! Each host gets its own /30 from 198.18.0.0/15 (RFC 2544's benchmarking range: never routed
//! outside a site, unlikely to be in use here): the host side of the veth holds the first address
//! ([`AgentHost::host_ip`], the HOST_IP an install config gives agents), the namespace side the
//! second, and the namespace's only route is its default route via the host side. Nothing else:
//! the namespace's loopback is its own, and there is no path to the host's 127.0.0.1, its Docker
//! networks or anything beyond, except what the host forwards for its own addresses. Docker's
//! ports published on the host side address (or 0.0.0.0) are reached that way (its DNAT applies
//! to packets for any local address), which is what an agent on another machine gets.
//!
//! Needs root (`ip netns`, `ip link`) and iproute2; a missing `ip` panics with the install
//! command. The namespace and the veth are removed on drop.

use super::{is_root, run, run_ok};
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

const IP_HINT: &str = "install iproute2 with `apt-get install iproute2` (or run scripts/setup.sh)";
/// 198.18.0.0/15 holds 2^15 subnets of 4 addresses.
const RANGE_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const SUBNETS: u32 = 1 << 15;

/// A network namespace standing for an agent host; removed with its veth on drop.
pub struct AgentHost {
    /// The host side of the veth: the address agents are given for this host (HOST_IP).
    pub host_ip: Ipv4Addr,
    /// The namespace side: the agent host's own address.
    pub agent_ip: Ipv4Addr,
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    host_if: String,
}

impl AgentHost {
    /// Creates the namespace, the veth pair and the addresses, with a /30 no other agent host
    /// of this process and no interface on this host already uses (parallel tests and test
    /// processes do not collide). Panics, naming the command and its output, when a step fails;
    /// what was made until then is removed.
    pub fn create() -> AgentHost {
        assert!(
            is_root(),
            "an agent host is a network namespace and a veth pair: the tests must run as root"
        );
        let tag = random_tag();
        let subnet = pick_subnet();
        let host = AgentHost {
            host_ip: Ipv4Addr::from(subnet + 1),
            agent_ip: Ipv4Addr::from(subnet + 2),
            ns: format!("bkagent-{tag}"),
            host_if: format!("bkah{tag}"),
        };
        let ns_if = format!("bkan{tag}");
        let (ns, host_if) = (host.ns.as_str(), host.host_if.as_str());
        let host_cidr = format!("{}/30", host.host_ip);
        let agent_cidr = format!("{}/30", host.agent_ip);
        let host_ip = host.host_ip.to_string();
        // From here on a panic drops `host`, which removes whatever was made.
        for args in [
            &["netns", "add", ns][..],
            &["link", "add", host_if, "type", "veth", "peer", "name", &ns_if],
            &["link", "set", &ns_if, "netns", ns],
            &["addr", "add", &host_cidr, "dev", host_if],
            &["link", "set", host_if, "up"],
            &["-n", ns, "addr", "add", &agent_cidr, "dev", &ns_if],
            &["-n", ns, "link", "set", &ns_if, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
            &["-n", ns, "route", "add", "default", "via", &host_ip],
        ] {
            run_ok(Command::new("ip").args(args), "an agent host's namespace", IP_HINT);
        }
        host
    }

    /// Runs `cmd` inside the namespace (`ip netns exec`) with its arguments, the environment
    /// it was given and its working directory, and returns its output (whatever the exit code).
    pub fn run(&self, cmd: &mut Command) -> Output {
        let mut inner = Command::new("ip");
        inner
            .args(["netns", "exec", &self.ns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => inner.env(k, v),
                None => inner.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            inner.current_dir(dir);
        }
        run(&mut inner, &format!("in agent host {}", self.ns), IP_HINT)
    }
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and with it the host's end; the
        // link deletion covers a namespace that was never made.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let subnet = u32::from(self.host_ip) - 1;
        taken().lock().unwrap_or_else(|e| e.into_inner()).remove(&subnet);
    }
}

/// The subnets this process has handed out and not yet dropped.
fn taken() -> &'static Mutex<HashSet<u32>> {
    static TAKEN: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    TAKEN.get_or_init(|| Mutex::new(HashSet::new()))
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Eight lowercase letters and digits for the namespace and interface names (interface names
/// are at most 15 bytes: `bkah` + 8).
fn random_tag() -> String {
    super::random_alnum(8).to_lowercase()
}

/// A random /30 of 198.18.0.0/15 (its network address) that this process has not handed out
/// and no IPv4 address on this host falls into (another test process's agent host).
fn pick_subnet() -> u32 {
    let out = run_ok(
        Command::new("ip").args(["-4", "-o", "addr", "show"]),
        "ip addr show",
        IP_HINT,
    );
    let in_use: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok())
        .map(|a| u32::from(a) & !3)
        .collect();
    let mut taken = taken().lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let subnet = RANGE_BASE + (random_u64() % u64::from(SUBNETS)) as u32 * 4;
        if !in_use.contains(&subnet) && taken.insert(subnet) {
            return subnet;
        }
    }
    panic!("no free /30 in 198.18.0.0/15 after 1000 tries");
}
