//! `kvroute events …`: inspection of vLLM KV-event payloads.

use anyhow::Context;
use clap::Subcommand;
use kvroute_events::decode_batch;

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Decode one msgpack KVEventBatch given as hex on stdin (the third ZMQ frame) and
    /// print it as JSON with vLLM's field names; hashes are printed as u64.
    Decode {
        /// Indent the JSON.
        #[arg(long)]
        pretty: bool,
    },
}

pub fn run(cmd: EventsCommand) -> anyhow::Result<()> {
    match cmd {
        EventsCommand::Decode { pretty } => {
            let input = super::read_stdin()?;
            let text: String = input.split_whitespace().collect();
            let text = text.strip_prefix("0x").unwrap_or(&text);
            let bytes = hex::decode(text).context("stdin must be the payload as hex")?;
            let batch = decode_batch(&bytes).context("not a valid KVEventBatch")?;
            let json = if pretty { serde_json::to_string_pretty(&batch)? } else { serde_json::to_string(&batch)? };
            println!("{json}");
            Ok(())
        }
    }
}
