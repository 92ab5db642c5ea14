//! prost types generated from `proto/*.proto` at build time.

/// Envelope and session messages (`proto/canal_packet.proto`).
pub mod packet {
    include!(concat!(env!("OUT_DIR"), "/canal.packet.rs"));
}

/// Change data (`proto/canal_entry.proto`).
pub mod entry {
    include!(concat!(env!("OUT_DIR"), "/canal.entry.rs"));
}
