//! `kvroute`: a KV-cache-aware request router for fleets of vLLM servers.
//!
//! Data flow, one crate per step:
//! `kvroute-events` (ZMQ payload → events) → `kvroute-index` (events → block index) ;
//! `kvroute-keys` (request tokens → block keys) → `kvroute-score` (keys → pod scores).

mod cli;
mod config;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvroute: {e:#}");
            ExitCode::from(2)
        }
    }
}
