//! supervise: keeps long-running Linux jobs alive across crashes by
//! checkpointing them with CRIU and restoring them from the newest good
//! image when they die.

pub mod check;
mod choice;
pub mod config;
pub mod control;
pub mod criu;
pub mod daemon;
pub mod fence;
pub mod files;
// TrustError carries the whole finding (owner, mode, rule) for the message.
pub mod fsutil;
pub mod init;
pub mod job;
pub mod metrics;
pub mod proc;
pub mod reaper;
pub mod schedule;
pub mod slurm;
pub mod store;
pub mod supervisor;
