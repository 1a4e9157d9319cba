//! A mesh to test against: a real etcd, a real `signpost server` with its
//! CA and DNS, and pods — an app with its `signpost sidecar` — each on its
//! own loopback address (127.0.<net>.<host>, one <net> per test so tests
//! run side by side).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{EtcdProcess, Process, free_port, signpost_bin, wait_http_ok, workspace_bin};

/// The admin token of every test mesh.
pub const ADMIN: &str = "mesh-admin-token-0123456789abcdef";

/// Owned arguments.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A running control plane and what its pods need.
pub struct Mesh {
    /// The third octet of every pod address.
    pub net: u8,
    /// The control plane's API base URL.
    pub api: String,
    /// Its DNS server.
    pub dns: SocketAddr,
    /// The test's directory: tokens, logs.
    pub dir: tempfile::TempDir,
    /// A plain client.
    pub http: reqwest::Client,
    etcd: EtcdProcess,
    /// The control plane.
    pub server: Process,
    server_args: Vec<String>,
}

/// An app with its sidecar on 127.0.<net>.<host>.
pub struct Pod {
    /// The last octet of its address.
    pub host: u8,
    /// The app.
    pub app: Process,
    /// Its sidecar.
    pub sidecar: Process,
}

/// How a mesh's control plane starts.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Workload certificate lifetime (`--cert-ttl`).
    pub cert_ttl: String,
    /// Whether the control plane has a CA (`--ca-dir`); without one it
    /// issues no certificates.
    pub with_ca: bool,
    /// The services to make tokens for.
    pub services: Vec<String>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            cert_ttl: "1h".into(),
            with_ca: true,
            services: vec!["user".into(), "order".into()],
        }
    }
}

impl Mesh {
    /// A mesh for `user` and `order`, certificates lasting `cert_ttl`.
    pub async fn start(net: u8, cert_ttl: &str) -> Mesh {
        Self::start_with(
            net,
            MeshOptions {
                cert_ttl: cert_ttl.into(),
                ..MeshOptions::default()
            },
        )
        .await
    }

    /// A mesh as `options` say.
    pub async fn start_with(net: u8, options: MeshOptions) -> Mesh {
        let etcd = EtcdProcess::spawn().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), ADMIN).unwrap();
        let ca = dir.path().join("ca");
        let out = std::process::Command::new(signpost_bin())
            .args(["ca", "init", "--dir", &ca.display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let api_port = free_port();
        let dns_port = free_port();
        let mut server_args = args(&[
            "server",
            "--etcd",
            &etcd.endpoint(),
            "--api",
            &format!("127.0.0.1:{api_port}"),
            "--dns",
            &format!("127.0.0.1:{dns_port}"),
            "--admin-token-file",
            &dir.path().join("admin.token").display().to_string(),
            "--cert-ttl",
            &options.cert_ttl,
            "--udp-sockets",
            "1",
        ]);
        if options.with_ca {
            server_args.extend(["--ca-dir".into(), ca.display().to_string()]);
        }
        let server = Process::spawn("signpost-server", &signpost_bin(), &server_args, dir.path());
        let api = format!("http://127.0.0.1:{api_port}");
        wait_http_ok(&format!("{api}/readyz"), Duration::from_secs(15)).await;
        let mesh = Mesh {
            net,
            api,
            dns: format!("127.0.0.1:{dns_port}").parse().unwrap(),
            dir,
            http: reqwest::Client::new(),
            etcd,
            server,
            server_args,
        };
        for svc in &options.services {
            let resp = mesh
                .http
                .post(format!("{}/v1/tokens", mesh.api))
                .bearer_auth(ADMIN)
                .json(&json!({"service": svc}))
                .send()
                .await
                .unwrap();
            let body: Value = resp.json().await.unwrap();
            std::fs::write(
                mesh.dir.path().join(format!("{svc}.token")),
                body["token"].as_str().unwrap(),
            )
            .unwrap();
        }
        mesh
    }

    /// The etcd the control plane keeps its state in.
    pub fn etcd(&self) -> &EtcdProcess {
        &self.etcd
    }

    /// Stops the control plane and starts it again with its arguments
    /// changed by `change`; waits until it is ready.
    pub async fn restart_server(&mut self, change: impl FnOnce(&mut Vec<String>)) {
        self.server.kill();
        change(&mut self.server_args);
        self.server = Process::spawn(
            "signpost-server-2",
            &signpost_bin(),
            &self.server_args,
            self.dir.path(),
        );
        wait_http_ok(&format!("{}/readyz", self.api), Duration::from_secs(15)).await;
    }

    /// The address of host `host`.
    pub fn ip(&self, host: u8) -> String {
        format!("127.0.{}.{host}", self.net)
    }

    /// Starts app `kind` (user or order) and its sidecar as instance `id`.
    pub async fn pod(&self, kind: &str, id: &str, host: u8) -> Pod {
        self.pod_with(kind, id, host, &[]).await
    }

    /// [`Mesh::pod`], with more sidecar flags.
    pub async fn pod_with(&self, kind: &str, id: &str, host: u8, flags: &[&str]) -> Pod {
        let ip = self.ip(host);
        let app = format!("{ip}:8080");
        let mut app_args = vec![
            "--listen".to_string(),
            app.clone(),
            "--id".into(),
            id.into(),
        ];
        if kind == "order" {
            app_args.extend(["--user-url".into(), "http://user".into()]);
        }
        let app_proc = if kind == "order" {
            // The order app reaches user through its sidecar's proxy.
            Process::spawn_env(
                &format!("{id}-app"),
                &workspace_bin("order"),
                &app_args,
                self.dir.path(),
                &[("http_proxy", &format!("http://{ip}:15001"))],
            )
        } else {
            Process::spawn(
                &format!("{id}-app"),
                &workspace_bin(kind),
                &app_args,
                self.dir.path(),
            )
        };
        let mut extra = vec!["--app-health".to_string(), "/health".to_string()];
        if kind == "order" {
            extra.extend(["--upstream".to_string(), format!("user={ip}:15432")]);
            // Both schedulers carry traffic: order's sidecar the
            // single-threaded one, user's a worker per CPU.
            extra.extend(["--threads".to_string(), "1".to_string()]);
        }
        extra.extend(flags.iter().map(|f| f.to_string()));
        let sidecar = self.sidecar(kind, id, host, &app, &extra).await;
        Pod {
            host,
            app: app_proc,
            sidecar,
        }
    }

    /// Starts a sidecar for `service` instance `id` on host `host` in
    /// front of the app at `app`, with `extra` flags,
    /// and waits until it is ready.
    pub async fn sidecar(
        &self,
        service: &str,
        id: &str,
        host: u8,
        app: &str,
        extra: &[String],
    ) -> Process {
        let sidecar = self.sidecar_unready(service, id, host, app, extra);
        let ip = self.ip(host);
        wait_http_ok(&format!("http://{ip}:15000/ready"), Duration::from_secs(20)).await;
        sidecar
    }

    /// Starts a sidecar as [`Mesh::sidecar`] does, without waiting.
    pub fn sidecar_unready(
        &self,
        service: &str,
        id: &str,
        host: u8,
        app: &str,
        extra: &[String],
    ) -> Process {
        let ip = self.ip(host);
        let mut sidecar_args = args(&[
            "sidecar",
            "--service",
            service,
            "--id",
            id,
            "--address",
            &ip,
            "--app",
            app,
            "--inbound",
            &format!("{ip}:15006"),
            "--outbound",
            &format!("{ip}:15001"),
            "--admin",
            &format!("{ip}:15000"),
            "--control-plane",
            &self.api,
            "--dns",
            &self.dns.to_string(),
            "--token-file",
            &self
                .dir
                .path()
                .join(format!("{service}.token"))
                .display()
                .to_string(),
            "--ttl",
            "6s",
            "--linger",
            "1s",
            "--drain",
            "5s",
        ]);
        sidecar_args.extend(extra.iter().cloned());
        Process::spawn(
            &format!("{id}-sidecar"),
            &signpost_bin(),
            &sidecar_args,
            self.dir.path(),
        )
    }

    /// The outbound proxy address of host `host`.
    pub fn outbound(&self, host: u8) -> SocketAddr {
        format!("{}:15001", self.ip(host))
            .parse()
            .expect("an address")
    }

    /// A client that sends everything through `pod`'s outbound proxy.
    pub fn via(&self, pod: &Pod) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}:15001", self.ip(pod.host))).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// Puts `svc`'s config.
    pub async fn put_config(&self, svc: &str, body: Value) {
        let resp = self
            .http
            .put(format!("{}/v1/services/{svc}/config", self.api))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }

    /// The metrics of `pod`'s sidecar.
    pub async fn metrics(&self, pod: &Pod) -> String {
        self.metrics_of(pod.host).await
    }

    /// The metrics of the sidecar on host `host`.
    pub async fn metrics_of(&self, host: u8) -> String {
        self.http
            .get(format!("http://{}:15000/metrics", self.ip(host)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}
