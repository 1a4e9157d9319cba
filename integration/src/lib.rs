//! End-to-end test support.
//!
//! This crate holds the end-to-end tests (in `tests/`) that start a real etcd,
//! real `signpost` processes and real clients, plus the helpers they share:
//! finding the built binary, starting and stopping processes on free loopback
//! ports, running `dig`, and polling with a deadline. It is never shipped.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod mesh;
pub mod netns;
pub mod probe;

pub use signpost_control_plane::testing::EtcdProcess;

/// The `signpost` binary built by `cargo build` (the test command builds it
/// before running tests). `SIGNPOST_BIN` overrides.
pub fn signpost_bin() -> PathBuf {
    if let Ok(path) = std::env::var("SIGNPOST_BIN") {
        return PathBuf::from(path);
    }
    workspace_bin("signpost")
}

/// A binary of the workspace (`signpost`, `user`, `order`) built by
/// `cargo build --workspace --bins`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("..").join("target"));
    let bin = target.join("debug").join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (./integration/test.sh does)",
        bin.display()
    );
    bin
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a loopback TCP port");
        let port = tcp.local_addr().expect("local addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both TCP and UDP");
}

/// A child process killed (SIGKILL) when dropped, with its output in a log
/// file that is printed when a test fails.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `bin args...` with stdout and stderr into `dir/<name>.log`.
    /// Its temporary files go under `dir` too (`TMPDIR`): a process dropped
    /// is killed, not stopped, and a `--dev` server would otherwise leave
    /// its throwaway CA in /tmp.
    pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> Process {
        Self::spawn_env(name, bin, args, dir, &[])
    }

    /// Like [`Process::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        bin: &Path,
        args: &[String],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Process {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let err = file.try_clone().expect("clone log file");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info,hickory_server=warn")
            .env("TMPDIR", dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Process {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for it to exit; returns its exit
    /// code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills it now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let mut stderr = std::io::stderr();
            let _ = writeln!(stderr, "----- {} log -----\n{}", self.name, self.output());
        }
    }
}

/// Runs `dig` with `args` (adding `+time=2 +tries=1` so it never hangs) and
/// returns its stdout. Fails the test with a clear message when dig is
/// missing.
pub fn dig(args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(args)
        .args(["+time=2", "+tries=1"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run dig ({e}): apt-get install bind9-dnsutils"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short` answers for `name` of `qtype` at `server`, sorted.
pub fn dig_short(server: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Vec<String> {
    let at = format!("@{}", server.ip());
    let port = server.port().to_string();
    let mut args = vec![at.as_str(), "-p", port.as_str(), name, qtype, "+short"];
    if tcp {
        args.push("+tcp");
    }
    let mut lines: Vec<String> = dig(&args)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// Polls a condition every 50 ms until it is true; panics naming what was
/// awaited after the timeout.
pub use signpost_control_plane::testing::assert_eventually as eventually;

/// Waits until `url` answers 200, or panics after `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let http = reqwest::Client::new();
    eventually(&format!("{url} answers 200"), timeout, || async {
        http.get(url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// The admin token of the servers [`spawn_server`] starts.
pub const ADMIN: &str = "integration-admin-token-0123456789";

/// A `signpost server` started by a test.
pub struct Server {
    /// The process.
    pub process: Process,
    /// Its API's base URL.
    pub api: String,
    /// Its DNS address.
    pub dns: SocketAddr,
}

/// A `signpost server` on the etcd endpoints `etcd` (comma-separated), its
/// API and DNS (one UDP socket) on free loopback ports, the admin token
/// [`ADMIN`] written to `dir/admin.token`, with `extra` flags. Callers wait
/// for `/readyz` as they need.
pub fn spawn_server(name: &str, etcd: &str, extra: &[&str], dir: &Path) -> Server {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, ADMIN).expect("write the admin token");
    let api_port = free_port();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args: Vec<String> = [
        "server",
        "--etcd",
        etcd,
        "--api",
        &format!("127.0.0.1:{api_port}"),
        "--dns",
        &dns.to_string(),
        "--admin-token-file",
        &token_file.display().to_string(),
        "--udp-sockets",
        "1",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Server {
        process: Process::spawn(name, &signpost_bin(), &args, dir),
        api: format!("http://127.0.0.1:{api_port}"),
        dns,
    }
}
