//! Demo services for Signpost (`user`, `order` and `grpc-echo`).
//!
//! This crate holds small example services that show the mesh at work. They
//! know nothing of Signpost: they speak plain HTTP and reach each other
//! through their sidecars — with `http_proxy`, or for gRPC by connecting to
//! the sidecar's outbound port.
//!
//! - [`user`]: `GET /users/{id}` answers a made-up user and names the
//!   instance that served it, so a demo can show the balancing.
//! - [`order`]: `GET /orders/{id}` answers an order with its user, fetched
//!   from `http://user/...` — through the sidecar when `http_proxy` is set.
//! - [`serve`]: the HTTP/1 server both run on (hyper), with graceful
//!   shutdown on SIGINT/SIGTERM; [`response`]: the JSON answers and errors.
//! - [`grpc`]: an Echo gRPC service over plain HTTP/2 (unary, server,
//!   client and bidirectional streams) that names the instance serving
//!   each call, its client side (a channel to a sidecar's outbound port
//!   calling a service by `:authority`) and an open-loop load generator;
//!   the `grpc-echo` and `grpc-call` binaries run them.
//!
//! It is not part of Signpost: nothing here registers, resolves or speaks
//! TLS — that is the sidecar's job, which is the point of the demo.
//!
//! ```no_run
//! use signpost_examples::{serve, user::UserService};
//!
//! # async fn example() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let service = UserService::new("u1");
//! serve::serve(listener, service, serve::shutdown_signal(), serve::DEFAULT_DRAIN).await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod grpc;
pub mod logging;
pub mod order;
pub mod response;
pub mod serve;
pub mod user;
