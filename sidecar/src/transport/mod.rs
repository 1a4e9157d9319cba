//! How the sidecar speaks HTTP on the wire: to peer sidecars, and to the
//! local app.
//!
//! Most of it is hyper. Three pieces sit below it, each replacing a part of
//! hyper on the request path where the README's sidecar benchmark measured
//! the difference in instructions per request (the change table in the
//! README's "Sidecar" benchmark section has the figures; they are kept
//! there, not here, so that they are kept true):
//!
//! - [`h2_client`] replaces hyper's HTTP/2 client between sidecars. hyper's
//!   sends each request through a channel to a dispatch task and spawns a
//!   task per response; here the task that read the request from the app
//!   sends it and awaits the response head itself (table row "outbound
//!   sends on the `h2` crate directly").
//! - [`h2_server`] replaces hyper's HTTP/2 server for a peer's connection.
//!   hyper's spawns a task per stream; here the streams are served inside
//!   the connection's task (row "inbound serves HTTP/2 streams inside the
//!   connection task").
//! - [`app::AppClient`] replaces hyper-util's pooled client from the
//!   inbound to the app over HTTP/1.1. hyper-util's serves any number of
//!   hosts: each request hashes its pool key, checks a connection out, and
//!   returns it through a task; the inbound talks to one address, so its
//!   pool is a stack of idle connections (row "inbound → app: its own stack
//!   of idle HTTP/1.1 connections").
//!
//! The price of going below hyper is what hyper did for free and these
//! modules now do by hand: HTTP/2 flow control and keep-alive
//! ([`http2`]), coalescing a burst of requests into one write
//! ([`http2::Batched`]: without it every request left in a write of its
//! own, which is what hyper's dispatch task had avoided), telling a
//! request the peer never processed from one it may have
//! ([`h2_client::SendError`]), and the rules for reusing an HTTP/1.1
//! connection ([`app`]).
//!
//! What stays on hyper, because nothing on the request path is gained by
//! leaving it: the HTTP/1.1 and HTTP/2 server the app talks to
//! ([`crate::serve`]), h2c to the app ([`app::AppH2Client`], hyper-util's
//! client), upgrades and `CONNECT` ([`http1`] and [`hyper::upgrade`]),
//! and calls that leave the mesh (hyper-util's client in
//! [`crate::outbound::proxy`]: it goes to any host, which is the job its
//! pool exists for, so a second pool of ours would repeat it).

pub(crate) mod app;
pub(crate) mod h2_client;
pub(crate) mod h2_server;
pub(crate) mod http1;
pub(crate) mod http2;
