//! etcd connection flags shared by `signpost server` and `signpost dns`:
//! endpoints' TLS and the etcd user.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use signpost_control_plane::store::{EtcdCredentials, EtcdOptions, EtcdTls, Store, StoreError};

/// How to authenticate to etcd and check its certificate. Write access to
/// etcd is control of the mesh: use both in production.
#[derive(Debug, Clone, Args)]
pub struct EtcdSecurityArgs {
    /// CA certificate (PEM) that signed etcd's server certificates; the
    /// --etcd URLs must then be https://.
    #[arg(long, env = "SIGNPOST_ETCD_CACERT", value_name = "FILE")]
    pub etcd_cacert: Option<PathBuf>,

    /// Client certificate (PEM) to present to etcd (etcd runs with
    /// --client-cert-auth). Needs --etcd-key and --etcd-cacert.
    #[arg(
        long,
        env = "SIGNPOST_ETCD_CERT",
        value_name = "FILE",
        requires_all = ["etcd_key", "etcd_cacert"]
    )]
    pub etcd_cert: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert.
    #[arg(
        long,
        env = "SIGNPOST_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, when etcd has authentication enabled. Needs
    /// --etcd-password-file.
    #[arg(long, env = "SIGNPOST_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the password of --etcd-user (a trailing newline is
    /// ignored).
    #[arg(
        long,
        env = "SIGNPOST_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        requires = "etcd_user"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

impl EtcdSecurityArgs {
    /// Store options for `endpoints`, with keys under `prefix`.
    pub fn options(&self, endpoints: &[String], prefix: &str) -> Result<EtcdOptions> {
        let tls = match &self.etcd_cacert {
            Some(ca) => Some(EtcdTls {
                ca_pem: read(ca, "--etcd-cacert")?,
                client: match (&self.etcd_cert, &self.etcd_key) {
                    (Some(cert), Some(key)) => {
                        Some((read(cert, "--etcd-cert")?, read(key, "--etcd-key")?))
                    }
                    _ => None,
                },
            }),
            None => None,
        };
        let credentials = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = String::from_utf8(read(file, "--etcd-password-file")?)
                    .with_context(|| format!("{} is not UTF-8 text", file.display()))?;
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                if password.is_empty() {
                    anyhow::bail!("the etcd password file {} is empty", file.display());
                }
                Some(EtcdCredentials {
                    user: user.clone(),
                    password,
                })
            }
            _ => None,
        };
        Ok(EtcdOptions {
            endpoints: endpoints.to_vec(),
            tls,
            credentials,
            // A key the etcd user may read: its role covers the prefix.
            ping_key: format!("{prefix}ping"),
            ..EtcdOptions::default()
        })
    }
}

/// Checks etcd once at start-up, when the catalog could not be read: a
/// refusal (wrong password, a role without the prefix) is fatal with its
/// cause; an etcd that does not answer is a warning, as the store keeps
/// trying.
pub async fn check_reachable(store: &dyn Store, endpoints: &[String], what: &str) -> Result<()> {
    match store.ping().await {
        Ok(_) => Ok(()),
        Err(e) if e.is_unavailable() => {
            eprintln!(
                "warning: etcd at {} does not answer yet ({e}); {what} until it does",
                endpoints.join(",")
            );
            Ok(())
        }
        Err(e @ StoreError::Other(_)) => {
            Err(e).with_context(|| format!("etcd at {} refused signpost", endpoints.join(",")))
        }
        Err(e) => Err(e).with_context(|| format!("etcd at {}", endpoints.join(","))),
    }
}
