//! Test support: a real etcd on free loopback ports, and [`eventually`].
//!
//! Compiled for this crate's tests and, through the `test-support` feature,
//! for other crates' tests. Nothing here is for production.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

/// How long a started etcd may take to answer. A single member elects
/// itself in about a second; the rest is slack for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd binary, taken from `$ETCD_BIN` or the `PATH`.
fn etcd_binary() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

/// A real single-member etcd, listening on free loopback ports, with its data
/// in a temporary directory. Killed when dropped.
///
/// It can be stopped and started again on the same ports and data, to test
/// what happens while etcd is down and after it comes back.
#[derive(Debug)]
pub struct EtcdProcess {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<EtcdTlsFiles>,
    /// Member name and `--initial-cluster`, when one of an [`EtcdCluster`].
    cluster: Option<(String, String)>,
}

/// The certificates of an etcd started by [`EtcdProcess::spawn_tls`], as
/// PEM files in its directory: a CA, etcd's server certificate (for
/// 127.0.0.1) and a client certificate the CA signed.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// etcd's certificate and key.
    pub server_cert: PathBuf,
    /// etcd's key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl EtcdTlsFiles {
    /// Writes a fresh CA, server and client certificate into `dir`.
    ///
    /// # Panics
    ///
    /// If a certificate cannot be made or written (test support only).
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "signpost test etcd CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            "etcd",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf("signpost", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let files = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        for (path, pem) in [
            (&files.ca, ca_cert.pem()),
            (&files.server_cert, server_cert),
            (&files.server_key, server_key),
            (&files.client_cert, client_cert),
            (&files.client_key, client_key),
        ] {
            std::fs::write(path, pem).expect("write a test certificate");
        }
        files
    }

    /// The store's TLS options for these files (CA and client certificate).
    ///
    /// # Panics
    ///
    /// If the files cannot be read.
    pub fn options(&self) -> crate::store::EtcdTls {
        let read = |p: &Path| std::fs::read(p).expect("read a test certificate");
        crate::store::EtcdTls {
            ca_pem: read(&self.ca),
            client: Some((read(&self.client_cert), read(&self.client_key))),
        }
    }
}

impl EtcdProcess {
    /// Starts etcd and waits (at most 10 s) until it answers reads.
    ///
    /// # Panics
    ///
    /// If the `etcd` binary is missing (install it with
    /// `apt-get install etcd-server`), or etcd does not come up in time; the
    /// message includes the end of etcd's log.
    pub async fn spawn() -> Self {
        // tmpfs makes etcd's fsyncs free, which matters on a busy test box.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("signpost-etcd-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("signpost-etcd-").tempdir()
        }
        .expect("cannot create a temporary directory for etcd");
        let (client_port, peer_port) = free_ports();
        let mut etcd = Self {
            dir,
            client_port,
            peer_port,
            child: None,
            tls: None,
            cluster: None,
        };
        etcd.start().await;
        etcd
    }

    /// Like [`EtcdProcess::spawn`], serving clients over TLS and requiring
    /// a client certificate signed by its CA (`--client-cert-auth`); see
    /// [`EtcdProcess::tls_files`].
    ///
    /// # Panics
    ///
    /// As [`EtcdProcess::spawn`].
    pub async fn spawn_tls() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("signpost-etcd-tls-")
            .tempdir()
            .expect("cannot create a temporary directory for etcd");
        let (client_port, peer_port) = free_ports();
        let tls = EtcdTlsFiles::generate(dir.path());
        let mut etcd = Self {
            dir,
            client_port,
            peer_port,
            child: None,
            tls: Some(tls),
            cluster: None,
        };
        etcd.start().await;
        etcd
    }

    /// The certificates, for an etcd from [`EtcdProcess::spawn_tls`].
    pub fn tls_files(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Turns etcd's authentication on, with `root` (password
    /// `root-secret`) and `user`, whose role may read and write `prefix`
    /// only: what an operator does before giving Signpost an etcd user.
    /// Plain (non-TLS) etcd only.
    pub async fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        use etcd_client::{Client, Permission, PermissionType};
        let mut admin = Client::connect([self.endpoint()], None)
            .await
            .expect("connect to etcd");
        admin
            .user_add("root", "root-secret", None)
            .await
            .expect("add root");
        admin
            .user_grant_role("root", "root")
            .await
            .expect("grant root");
        admin.role_add(user).await.expect("add the role");
        admin
            .role_grant_permission(
                user,
                Permission::new(PermissionType::Readwrite, prefix).with_prefix(),
            )
            .await
            .expect("grant the prefix");
        admin
            .user_add(user, password, None)
            .await
            .expect("add the user");
        admin
            .user_grant_role(user, user)
            .await
            .expect("grant the role");
        admin.auth_enable().await.expect("enable auth");
    }

    /// The directory holding etcd's data and its log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// etcd's combined stdout and stderr, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Whether the process is running (as far as we started it).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills etcd, keeping its data and ports for [`EtcdProcess::start`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: we only want it gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd (again) on the same ports and data, and waits until it
    /// answers. Does nothing if it is running.
    ///
    /// # Panics
    ///
    /// As [`EtcdProcess::spawn`].
    pub async fn start(&mut self) {
        if self.is_running() {
            return;
        }
        self.launch();
        self.wait_ready().await;
    }

    /// The peer URL.
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts the process without waiting for it.
    fn launch(&mut self) {
        let log = self.open_log();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let data = self.dir.path().join("data");
        let (name, initial_cluster) = self
            .cluster
            .clone()
            .unwrap_or_else(|| ("signpost-test".to_string(), format!("signpost-test={peer}")));
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(initial_cluster)
            // Heartbeat 50 ms / election 500 ms instead of 100 / 1000: the
            // member elects itself faster after a restart, and etcd's
            // minimum lease TTL (1.5 election timeouts) drops from 2 s to
            // 1 s, so short-lease tests behave as written.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--log-level")
            .arg("warn");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .expect("cannot duplicate the etcd log handle"),
            )
            .stderr(log);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the etcd binary `{}` was not found: these tests need a real etcd; \
                 install it with `apt-get install etcd-server` (or set ETCD_BIN)",
                etcd_binary()
            ),
            Err(e) => panic!("cannot start etcd `{}`: {e}", etcd_binary()),
        };
        self.child = Some(child);
    }

    fn open_log(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("cannot open the etcd log file")
    }

    async fn wait_ready(&mut self) {
        let endpoint = self.endpoint();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "etcd exited with {status} while starting:\n{}",
                    self.log_tail()
                );
            }
            if probe(&endpoint, self.tls.as_ref()).await {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "etcd at {endpoint} did not answer within {READY_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A real etcd cluster of several members on loopback, each an
/// [`EtcdProcess`] that can be killed (SIGKILL) and started again.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdProcess>,
}

impl EtcdCluster {
    /// Starts `size` members and waits (at most 10 s) until each answers.
    ///
    /// # Panics
    ///
    /// As [`EtcdProcess::spawn`].
    pub async fn spawn(size: usize) -> Self {
        let mut members: Vec<EtcdProcess> = (0..size)
            .map(|_| {
                let dir = tempfile::Builder::new()
                    .prefix("signpost-etcd-member-")
                    .tempdir_in(if Path::new("/dev/shm").is_dir() {
                        Path::new("/dev/shm")
                    } else {
                        Path::new("/tmp")
                    })
                    .expect("cannot create a temporary directory for etcd");
                let (client_port, peer_port) = free_ports();
                EtcdProcess {
                    dir,
                    client_port,
                    peer_port,
                    child: None,
                    tls: None,
                    cluster: None,
                }
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("m{i}={}", m.peer_url()))
            .collect();
        let initial = initial.join(",");
        for (i, member) in members.iter_mut().enumerate() {
            member.cluster = Some((format!("m{i}"), initial.clone()));
            member.launch();
        }
        for member in &mut members {
            member.wait_ready().await;
        }
        Self { members }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdProcess::endpoint).collect()
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut EtcdProcess {
        &mut self.members[i]
    }

    /// Starts the given members (stopped ones) together and waits until
    /// each answers: members that lost quorum come back only together.
    ///
    /// # Panics
    ///
    /// As [`EtcdProcess::spawn`].
    pub async fn start(&mut self, members: &[usize]) {
        for &i in members {
            if !self.members[i].is_running() {
                self.members[i].launch();
            }
        }
        for &i in members {
            self.members[i].wait_ready().await;
        }
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the current leader, as a running member reports it
    /// (`None` while there is none).
    pub async fn leader(&mut self) -> Option<usize> {
        let endpoints = self.endpoints();
        for (i, endpoint) in endpoints.iter().enumerate() {
            if !self.members[i].is_running() {
                continue;
            }
            let status = async {
                let mut client = etcd_client::Client::connect([endpoint], None).await.ok()?;
                client.status().await.ok()
            };
            let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(1), status).await
            else {
                continue;
            };
            let leader = status.leader();
            if leader == 0 {
                continue;
            }
            // Ask the leader itself for its id, to map it to an index.
            for (j, other) in endpoints.iter().enumerate() {
                if !self.members[j].is_running() {
                    continue;
                }
                let id = async {
                    let mut client = etcd_client::Client::connect([other], None).await.ok()?;
                    let s = client.status().await.ok()?;
                    s.header().map(|h| h.member_id())
                };
                if let Ok(Some(id)) = tokio::time::timeout(Duration::from_secs(1), id).await
                    && id == leader
                {
                    return Some(j);
                }
            }
            return None;
        }
        None
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether etcd at `endpoint` answers a linearizable read, i.e. has a
/// leader and serves clients.
async fn probe(endpoint: &str, tls: Option<&EtcdTlsFiles>) -> bool {
    let attempt = async {
        let options = tls.map(|files| {
            let tls = files.options();
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(tls.ca_pem));
            if let Some((cert, key)) = tls.client {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            etcd_client::ConnectOptions::new().with_tls(config)
        });
        let mut client = etcd_client::Client::connect([endpoint], options)
            .await
            .ok()?;
        client.get("signpost-probe", None).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

/// Two distinct free loopback ports. They are released before etcd binds
/// them, so another process could take one in between; that is rare enough
/// for tests.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
    let b = TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
    let port = |l: &TcpListener| {
        l.local_addr()
            .expect("bound listener has an address")
            .port()
    };
    (port(&a), port(&b))
}

/// Polls `condition` every `poll` until it is true (returns `true`) or
/// `timeout` has passed (returns `false`). A condition still running at the
/// deadline is abandoned, so this never waits much past `timeout`.
///
/// Use it instead of sleeping and hoping: `assert!(eventually(5 s, 100 ms,
/// || async { store.get(k).await.unwrap().is_none() }).await)`.
pub async fn eventually<F, Fut>(timeout: Duration, poll: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, condition()).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until((now + poll).min(deadline)).await;
    }
}

/// [`eventually`] as an assertion: polls `condition` every 50 ms and
/// panics, naming `what`, if it is not true within `timeout`.
pub async fn assert_eventually<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        eventually(timeout, Duration::from_millis(50), condition).await,
        "timed out after {timeout:?} waiting for: {what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn eventually_waits_for_the_condition() {
        let start = Instant::now();
        let ok = eventually(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || async { start.elapsed() >= Duration::from_secs(1) },
        )
        .await;
        assert!(ok);
        assert!(start.elapsed() < Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_gives_up_at_the_deadline() {
        let start = Instant::now();
        let ok = eventually(
            Duration::from_secs(2),
            Duration::from_millis(300),
            || async { false },
        )
        .await;
        assert!(!ok);
        assert!(start.elapsed() <= Duration::from_millis(2100));
    }

    #[tokio::test(start_paused = true)]
    async fn eventually_abandons_a_hanging_condition() {
        let start = Instant::now();
        let ok = eventually(Duration::from_secs(1), Duration::from_millis(100), || {
            std::future::pending::<bool>()
        })
        .await;
        assert!(!ok);
        assert!(start.elapsed() <= Duration::from_millis(1100));
    }
}
