//! Command-line interface: one module per subcommand.

mod bench;
mod capacity;
mod demo;
mod events;
mod fleet;
mod grpc;
mod hash;
mod lifecycle;
mod observe;
mod profile;
mod serve;
mod sidecar;
mod simulate;
mod workload;

use clap::{Parser, Subcommand};

/// KV-cache-aware request router for fleets of vLLM servers.
#[derive(Parser, Debug)]
#[command(name = "kvroute", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compute vLLM's block hashes for token ids read as a JSON array on stdin.
    Hash(hash::HashArgs),
    /// Inspect vLLM KV-cache event payloads.
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// Start a local fleet of simulated vLLM servers behind a kvroute router and compare
    /// round-robin with kvroute on llm-d's seed test and a shared-prefix workload.
    Demo(demo::DemoArgs),
    /// Run the router: follow the fleet's KV events over ZMQ, route OpenAI requests
    /// (`--listen`), and serve the admin API (`/v1/kv/score`, `/v1/kv/pods`,
    /// `/v1/route/explain`, `/metrics`) on `--admin-listen` (loopback by default); SIGTERM
    /// or SIGINT drain it (--shutdown-delay, --shutdown-grace).
    Serve(Box<serve::ServeArgs>),
    /// llm-d's P/D routing sidecar for a decode pod: in front of vLLM (`--vllm-port`),
    /// requests with `x-prefiller-host-port` are prefilled there, then decoded locally
    /// (NixlConnector `kv_transfer_params`); prefill targets must be allow-listed
    /// (`--prefill-allow`, or the pool's Ready pods with `--pool-name`; else 403).
    Sidecar(Box<sidecar::SidecarArgs>),
    /// Run a vLLM-compatible model-server simulator (OpenAI API, prefix cache with
    /// vLLM-exact block hashes, KV events over ZMQ, vLLM metrics, latency model); SIGTERM or
    /// SIGINT stop it as they stop vLLM: requests in flight finish, then exit 0.
    Sim(Box<kvroute_sim::SimArgs>),
    /// Simulate a fleet offline on virtual time with the real scheduler, comparing
    /// routing policies on a trace or a shared-prefix workload.
    Simulate(Box<simulate::SimulateArgs>),
    /// Drive a live OpenAI endpoint (the kvroute gateway or a server) with a seeded
    /// shared-prefix workload; report hit rate, TTFT, latency, errors, throughput.
    Bench(Box<bench::BenchArgs>),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Hash(a) => hash::run(a),
        Command::Events { command } => events::run(command),
        Command::Demo(a) => demo::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Simulate(a) => simulate::run(*a),
        Command::Bench(a) => bench::run(*a),
        Command::Sidecar(a) => sidecar::run(*a),
        Command::Sim(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            Ok(kvroute_sim::run(*a)?)
        }
    }
}

/// Reads all of stdin as a string.
fn read_stdin() -> anyhow::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).map_err(|e| anyhow::anyhow!("cannot read stdin: {e}"))?;
    Ok(s)
}
