//! Compiles our Canal .proto files with prost, using protox (pure Rust) so no system `protoc`
//! is needed. The two files are compiled separately: they share names such as `HEARTBEAT` in
//! Canal's originals, and separate packages keep them apart.

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
