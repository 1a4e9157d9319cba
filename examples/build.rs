//! Generates the Echo gRPC service (client and server) from
//! `proto/echo.proto` into `OUT_DIR`, included by `src/grpc.rs`.

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // `bytes::Bytes` rather than `Vec<u8>`: a server stream sends the
        // same payload `count` times, and cloning `Bytes` copies nothing.
        .bytes(".signpost.echo.v1")
        .compile_protos(&["proto/echo.proto"], &["proto"])
}
