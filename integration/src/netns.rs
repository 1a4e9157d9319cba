//! Pods as network namespaces: each with its own 10.x address on a bridge
//! and its own resolv.conf (`/etc/netns/<name>/resolv.conf`, which
//! `ip netns exec` mounts over /etc/resolv.conf). Everything is created by
//! the test, in a 10.x subnet of its own, and removed on drop.

use std::net::Ipv4Addr;
use std::process::{Command, Output};

/// Runs a command, returning its output, or an error naming it.
fn run(cmd: &[&str]) -> Result<Output, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why namespaces cannot be used here, if they cannot: tests print it and
/// skip (never silently).
pub fn unavailable() -> Option<String> {
    // The uid from /proc: no libc call needed.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("1");
    if uid != "0" {
        return Some("network namespaces need root (run the tests as root)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` is missing (apt-get install iproute2)".into());
    }
    // One probe name per call: tests of one binary probe at the same time.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("sp-probe-{}-{n}", std::process::id());
    if let Err(err) = run(&["ip", "netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {err}"));
    }
    let _ = run(&["ip", "netns", "del", &probe]);
    None
}

/// A bridge with an address in a /24 of its own, and pods attached to it.
pub struct Network {
    bridge: String,
    /// The subnet's first three octets.
    prefix: [u8; 3],
    pods: Vec<String>,
    veths: Vec<String>,
}

/// One pod: a namespace with an address.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Namespace name.
    pub name: String,
    /// Its address on the bridge.
    pub address: Ipv4Addr,
}

impl Network {
    /// Creates bridge `spbr<tag>` with 10.<a>.<b>.1/24, where `a.b` comes
    /// from `tag` so that concurrent tests use different subnets.
    pub fn create(tag: u16) -> Result<Network, String> {
        let prefix = [10, 200 + (tag % 50) as u8, (tag / 50 % 250) as u8];
        let bridge = format!("spbr{tag}");
        let net = Network {
            bridge: bridge.clone(),
            prefix,
            pods: Vec::new(),
            veths: Vec::new(),
        };
        let _ = run(&["ip", "link", "del", &bridge]);
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        let gw = format!("{}/24", net.gateway());
        run(&["ip", "addr", "add", &gw, "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's own address (the "node" address pods reach).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], 1)
    }

    /// Adds another address of the node, `.host` in the bridge's /24 (a
    /// second DNS replica listens there).
    pub fn add_node_address(&self, host: u8) -> Result<Ipv4Addr, String> {
        let address = Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &self.bridge,
        ])?;
        Ok(address)
    }

    /// The subnet, as a CIDR.
    pub fn cidr(&self) -> String {
        format!(
            "{}.{}.{}.0/24",
            self.prefix[0], self.prefix[1], self.prefix[2]
        )
    }

    /// Adds pod number `n` (address .10+n) with `resolv_conf`.
    pub fn add_pod(&mut self, n: u8, resolv_conf: &str) -> Result<Pod, String> {
        let name = format!("{}-p{n}", self.bridge);
        let host_if = format!("{}h{n}", self.bridge);
        let pod_if = format!("{}c{n}", self.bridge);
        let address = Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], 10 + n);
        let _ = run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name])?;
        self.pods.push(name.clone());
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
        ])?;
        self.veths.push(host_if.clone());
        run(&["ip", "link", "set", &pod_if, "netns", &name])?;
        run(&["ip", "link", "set", &host_if, "master", &self.bridge])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        let cidr = format!("{address}/24");
        run(&[
            "ip", "netns", "exec", &name, "ip", "addr", "add", &cidr, "dev", &pod_if,
        ])?;
        run(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &pod_if, "up",
        ])?;
        run(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ])?;
        let gw = self.gateway().to_string();
        run(&[
            "ip", "netns", "exec", &name, "ip", "route", "add", "default", "via", &gw,
        ])?;
        let dir = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{dir}: {e}"))?;
        std::fs::write(format!("{dir}/resolv.conf"), resolv_conf)
            .map_err(|e| format!("{dir}/resolv.conf: {e}"))?;
        Ok(Pod { name, address })
    }
}

impl Pod {
    /// Runs `cmd` inside the pod.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {}: {e}", self.name))
    }

    /// A `Command` that runs `program` inside the pod.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = run(&["ip", "netns", "del", pod]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{pod}"));
        }
        for veth in &self.veths {
            let _ = run(&["ip", "link", "del", veth]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
