//! supervise: keeps long-running Linux jobs alive across crashes by
//! checkpointing them with CRIU and restoring them from the newest good
//! image when they die.

mod admission;
pub mod check;
mod choice;
pub mod config;
pub mod control;
pub mod criu;
pub mod daemon;
pub mod failpoint;
pub mod fdlimit;
pub mod fence;
pub mod files;
pub mod fsutil;
pub mod init;
pub mod interval;
pub mod job;
pub mod metrics;
pub mod pages;
pub mod pidfd;
pub mod proc;
pub mod reaper;
mod schedule;
pub mod service;
mod slurm;
pub mod store;
mod supervisor;
pub mod systemd;
pub mod tcp;
pub mod uffd;
pub mod userns;
