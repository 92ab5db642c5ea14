//! Compiles our Canal .proto files with prost, using protox (pure Rust) so no system `protoc`
//! is needed. The two files are compiled separately: they share names such as `HEARTBEAT` in
//! Canal's originals, and separate packages keep them apart.
//!
//! Also sets `cfg(real_services)` when `CC_REAL_SERVICES=1` (set by `deploy/local/test`): the
//! tests that need the real MariaDB, Canal, RabbitMQ, ZooKeeper or a container engine run only
//! then, and a plain `cargo test` lists them as ignored with the reason.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rustc-check-cfg=cfg(real_services)");
    println!("cargo:rerun-if-env-changed=CC_REAL_SERVICES");
    if std::env::var("CC_REAL_SERVICES").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=real_services");
    }
    for file in ["proto/canal_packet.proto", "proto/canal_entry.proto"] {
        println!("cargo:rerun-if-changed={file}");
        let fds = protox::compile([file], ["proto"])?;
        prost_build::Config::new()
            // `bytes` fields borrow from the frame instead of copying it
            .bytes(["."])
            .compile_fds(fds)?;
    }
    Ok(())
}
