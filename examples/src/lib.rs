//! Demo services for Signpost (`user` and `order`).
//!
//! This crate holds small example services that show the mesh at work. They
//! know nothing of Signpost: they speak plain HTTP and reach each other
//! through their sidecars with `http_proxy`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
