//! `kvroute hash`: vLLM's block hashes for a token sequence.

use anyhow::{bail, Context};
use clap::Args;
use kvroute_keys::{BlockHasher, HashAlgo, HashConfig, LoraRef, MmItem, RequestExtras, VllmVersion};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct HashArgs {
    /// Prefix-caching hash algorithm (vLLM's `--prefix-caching-hash-algo`): sha256_cbor,
    /// sha256, sha256_cbor_64bit, xxhash, xxhash_cbor or builtin.
    #[arg(long, default_value = "sha256")]
    algo: HashAlgo,
    /// PYTHONHASHSEED exactly as the vLLM servers' environment holds it.
    #[arg(long, conflicts_with = "no_seed")]
    seed: Option<String>,
    /// PYTHONHASHSEED is unset on the servers (the default when --seed is not given).
    #[arg(long)]
    no_seed: bool,
    /// Tokens per KV block (vLLM's `--block-size`).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// vLLM release whose hashing rules apply (extra-key format, NONE_HASH seeding).
    #[arg(long, default_value_t = VllmVersion::LATEST)]
    vllm_version: VllmVersion,
    /// The request's `cache_salt`.
    #[arg(long)]
    cache_salt: Option<String>,
    /// LoRA adapter name (`lora_name`).
    #[arg(long)]
    lora_name: Option<String>,
    /// LoRA adapter path (`lora_path`; hashed by vLLM ≥ 0.31).
    #[arg(long, requires = "lora_name", default_value = "")]
    lora_path: String,
    /// LoRA adapter int id (`lora_int_id`; hashed by vLLM ≤ 0.11.0).
    #[arg(long, requires = "lora_name", default_value_t = 1)]
    lora_id: i64,
    /// A multimodal item as IDENTIFIER:OFFSET:LENGTH (repeatable, in prompt order).
    #[arg(long = "mm", value_parser = parse_mm)]
    mm: Vec<MmItem>,
}

fn parse_mm(s: &str) -> Result<MmItem, String> {
    let mut it = s.rsplitn(3, ':');
    let (len, off, id) = (it.next(), it.next(), it.next());
    match (id, off.and_then(|o| o.parse().ok()), len.and_then(|l| l.parse().ok())) {
        (Some(id), Some(offset), Some(length)) => Ok(MmItem { identifier: id.to_string(), offset, length }),
        _ => Err(format!("expected IDENTIFIER:OFFSET:LENGTH, got {s:?}")),
    }
}

#[derive(Serialize)]
struct Block {
    hash_hex: String,
    event_u64: u64,
}

#[derive(Serialize)]
struct Output {
    none_hash: String,
    blocks: Vec<Block>,
}

pub fn run(a: HashArgs) -> anyhow::Result<()> {
    let input = super::read_stdin()?;
    let tokens: Vec<u32> = serde_json::from_str(&input)
        .context("stdin must be a JSON array of token ids (non-negative integers below 2^32)")?;
    let seed = if a.no_seed { None } else { a.seed };
    let hasher =
        BlockHasher::new(HashConfig { algo: a.algo, vllm_version: a.vllm_version, seed, block_size: a.block_size })?;
    let mut mm = a.mm;
    mm.sort_by_key(|m| m.offset);
    if let Some(last) = mm.iter().find(|m| m.offset + m.length > tokens.len()) {
        bail!("multimodal item {:?} ends past the {} tokens given", last.identifier, tokens.len());
    }
    let extras = RequestExtras {
        lora: a.lora_name.map(|name| LoraRef { name, int_id: a.lora_id, path: a.lora_path }),
        cache_salt: a.cache_salt,
        mm,
    };
    let blocks = hasher
        .hash_prompt(&tokens, &extras)
        .into_iter()
        .map(|b| Block { hash_hex: b.value.to_hex(), event_u64: b.event })
        .collect();
    let out = Output { none_hash: hasher.none_hash().to_hex(), blocks };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
