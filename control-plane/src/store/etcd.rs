//! etcd store. PLACEHOLDER: being implemented.

use std::time::Duration;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Endpoints (`http://127.0.0.1:2379`); tried in order, failing over.
    pub endpoints: Vec<String>,
    /// Time limit for connecting to one endpoint.
    pub connect_timeout: Duration,
    /// Time limit for one operation, failover included.
    pub op_timeout: Duration,
}

/// The etcd-backed store.
#[derive(Debug)]
pub struct EtcdStore {}
