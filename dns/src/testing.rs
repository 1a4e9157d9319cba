//! Test support: catalog states built in memory, the way the store's watch
//! would build them, and the `user`/`order` fixture most DNS tests answer
//! from. For this crate's tests and, with the `test-support` feature, its
//! integration tests; not part of the server.

use std::time::SystemTime;

use signpost_control_plane::catalog::{CatalogState, Snapshot};
use signpost_control_plane::model::{Health, HealthStatus, Instance, InstanceId, ServiceName};
use signpost_control_plane::store::{KeyValue, Keys};

/// A catalog state a test edits (each change one store revision) and then
/// snapshots or publishes into a live catalog.
#[derive(Debug)]
pub struct Fill {
    /// The state, to publish into a live
    /// [`Catalog`](signpost_control_plane::catalog::Catalog).
    pub state: CatalogState,
    keys: Keys,
    rev: i64,
}

impl Default for Fill {
    fn default() -> Self {
        Self {
            state: CatalogState::new(),
            keys: Keys::default(),
            rev: 0,
        }
    }
}

impl Fill {
    fn kv(&mut self, key: String, value: Vec<u8>) -> KeyValue {
        self.rev += 1;
        KeyValue {
            key,
            value,
            create_revision: self.rev,
            mod_revision: self.rev,
            lease: None,
        }
    }

    /// Registers `inst` (or replaces the instance of the same id).
    pub fn put(&mut self, inst: &Instance) -> &mut Self {
        let value = serde_json::to_vec(inst).expect("an instance encodes");
        let kv = self.kv(self.keys.instance(&inst.service, &inst.id), value);
        self.state.put(&self.keys, &kv);
        self
    }

    /// Deregisters instance `id` of `svc`.
    pub fn delete(&mut self, svc: &str, id: &str) -> &mut Self {
        self.rev += 1;
        let key = self.keys.instance(&service(svc), &instance_id(id));
        self.state.delete(&self.keys, &key, self.rev);
        self
    }

    /// Marks instance `id` of `svc` critical (its health check failing).
    pub fn critical(&mut self, svc: &str, id: &str) -> &mut Self {
        let health = Health {
            status: HealthStatus::Critical,
            output: "connection refused".into(),
            since: SystemTime::now(),
        };
        let key = self.keys.health(&service(svc), &instance_id(id));
        let kv = self.kv(key, serde_json::to_vec(&health).expect("a health encodes"));
        self.state.put(&self.keys, &kv);
        self
    }

    /// The snapshot of the state so far.
    pub fn snapshot(&mut self) -> Snapshot {
        self.state.snapshot()
    }
}

fn service(svc: &str) -> ServiceName {
    ServiceName::new(svc).expect("a valid service name")
}

fn instance_id(id: &str) -> InstanceId {
    InstanceId::new(id).expect("a valid instance id")
}

/// An instance of weight 100 with no tags, named ports, metadata or check.
pub fn instance(svc: &str, id: &str, addr: &str, port: u16) -> Instance {
    Instance {
        service: service(svc),
        id: instance_id(id),
        address: addr.parse().expect("a valid address"),
        port,
        ports: Default::default(),
        tags: Vec::new(),
        meta: Default::default(),
        weight: 100,
        ttl: None,
        check: None,
        registered: SystemTime::now(),
    }
}

/// The instances of the `user`/`order` fixture: `user` u1 (tag `v2`, port
/// `http` 8081, meta `version=1.2.3`), u2, u3 and u6 (IPv6), all on 8080
/// but u6 on 9090; `order` o1. [`user_and_order`] marks u3 critical.
pub fn user_and_order_instances() -> [Instance; 5] {
    let mut u1 = instance("user", "u1", "10.0.0.1", 8080);
    u1.tags = vec!["v2".into()];
    u1.ports.insert("http".into(), 8081);
    u1.meta.insert("version".into(), "1.2.3".into());
    [
        u1,
        instance("user", "u2", "10.0.0.2", 8080),
        instance("user", "u3", "10.0.0.3", 8080),
        instance("user", "u6", "fd00::6", 9090),
        instance("order", "o1", "10.0.1.1", 7000),
    ]
}

/// `instances` registered, u3 of `user` critical.
pub fn fill_with(instances: &[Instance]) -> Fill {
    let mut fill = Fill::default();
    for inst in instances {
        fill.put(inst);
    }
    fill.critical("user", "u3");
    fill
}

/// The catalog of most tests: [`user_and_order_instances`] with u3
/// critical, so `user` has two healthy IPv4 instances and one IPv6.
pub fn user_and_order() -> Fill {
    fill_with(&user_and_order_instances())
}
