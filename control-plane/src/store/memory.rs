//! In-process store for `--dev`. PLACEHOLDER: being implemented.

/// An in-memory store with etcd's semantics.
#[derive(Debug, Default)]
pub struct MemoryStore {}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}
