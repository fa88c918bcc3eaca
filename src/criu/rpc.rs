//! CRIU's RPC messages (`criu swrk`) and its image statistics.
//!
//! The RPC types (`rpc_gen.rs`, committed) are generated from CRIU's
//! `rpc.proto`, vendored as `src/criu/rpc.proto` from CRIU 4.2.1 (Debian's
//! `libcriu-dev`, `/usr/include/criu/rpc.proto`), by `cargo build
//! --features regen-rpc` (`build.rs`: protox compiles, prost-build writes
//! Rust; no protoc). A unit test checks that the generated file was made
//! from the vendored proto. prost skips unknown fields when decoding, so a
//! newer CRIU's extra response fields are harmless.
//!
//! The statistics types below are hand-derived from CRIU's
//! `images/stats.proto`, which `libcriu-dev` does not install; only the
//! fields supervise reads are declared.

// The generated docs are rpc.proto's comments, which CRIU indents with tabs.
#![allow(clippy::tabs_in_doc_comments)]

include!("rpc_gen.rs");

/// `stats_entry` / `dump_stats_entry` from CRIU's `stats.proto` (the
/// `stats-dump` file in an image directory). Times are microseconds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DumpStatsEntry {
    #[prost(uint32, optional, tag = "1")]
    pub freezing_time: Option<u32>,
    #[prost(uint32, optional, tag = "2")]
    pub frozen_time: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    pub memdump_time: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pub memwrite_time: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    pub pages_scanned: Option<u64>,
    #[prost(uint64, optional, tag = "6")]
    pub pages_skipped_parent: Option<u64>,
    #[prost(uint64, optional, tag = "7")]
    pub pages_written: Option<u64>,
}

/// `restore_stats_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RestoreStatsEntry {
    #[prost(uint64, optional, tag = "1")]
    pub pages_compared: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    pub pages_skipped_cow: Option<u64>,
    #[prost(uint32, optional, tag = "3")]
    pub forking_time: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pub restore_time: Option<u32>,
}

/// `stats_entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    pub dump: Option<DumpStatsEntry>,
    #[prost(message, optional, tag = "2")]
    pub restore: Option<RestoreStatsEntry>,
}

#[cfg(test)]
mod tests {
    /// `rpc_gen.rs` was generated from the vendored `rpc.proto` (its header
    /// records the proto's SHA-256): after changing the proto, run `cargo
    /// build --features regen-rpc`.
    #[test]
    fn generated_types_match_the_vendored_proto() {
        use sha2::Digest;
        let proto = include_bytes!("rpc.proto");
        let want = hex::encode(sha2::Sha256::digest(proto));
        let generated = include_str!("rpc_gen.rs");
        let first = generated.lines().next().unwrap_or_default();
        assert!(
            first.contains(&format!("sha256 {want}")),
            "src/criu/rpc_gen.rs is stale ({first}); regenerate it with `cargo build --features regen-rpc`"
        );
    }
}
