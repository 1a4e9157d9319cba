//! How the sidecar speaks HTTP: to peer sidecars, and to the local app.

pub mod app;
pub mod http2;
