//! Fuzzes the HTTP door from the request body in: any bytes are parsed as a JSON body the
//! way the gateway does, and every JSON object is routed by the real `Gateway::route`
//! (prompt or chat extraction, token ids or tokenization with the built-in tokenizer, keys,
//! index lookup, the default scheduling profile) as a dry run over three pods that are
//! never contacted. The first byte picks completions or chat and whether a session header
//! is set. Nothing may panic; every outcome is a decision or a client error with a status.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use kvroute_api::{RequestKeys, SharedIndex};
use kvroute_gateway::{Backend, Gateway, Pool, RouteRequest};
use kvroute_index::{EventApplier, InMemoryIndex, IndexConfig, KeyMode, Pods};
use kvroute_keys::RequestKeyer;
use libfuzzer_sys::fuzz_target;

fn gateway() -> &'static (Gateway, tokio::runtime::Runtime) {
    static G: OnceLock<(Gateway, tokio::runtime::Runtime)> = OnceLock::new();
    G.get_or_init(|| {
        let pods = Pods::new();
        let backends = (0..3)
            .map(|i| {
                let name = format!("127.0.0.1:{}", 9 + i);
                Arc::new(Backend::new(&format!("http://{name}"), pods.intern(&name).unwrap()))
            })
            .collect();
        let pool = Arc::new(Pool { backends, lora_names: Default::default() });
        let index: SharedIndex = Arc::new(InMemoryIndex::new(IndexConfig { capacity: 1 << 16, ..Default::default() }));
        let keyer = RequestKeyer::new(16, "0");
        let applier = Arc::new(EventApplier::new(index, KeyMode::Request(keyer.clone())));
        let mut tokenizers = HashMap::new();
        tokenizers.insert("m".to_string(), kvroute_tokenize::load(None).unwrap());
        let profile = kvroute_schedule::SchedulerConfig::default_profile();
        let registry = prometheus::Registry::new();
        let g =
            Gateway::new(pool, profile, applier, Arc::new(RequestKeys::Request(keyer)), tokenizers, &registry).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        (g, rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else { return };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    if !v.is_object() {
        return;
    }
    let (g, rt) = gateway();
    let model = v.get("model").and_then(serde_json::Value::as_str).unwrap_or("m").to_string();
    let req = RouteRequest {
        chat: flags & 1 == 1,
        model: &model,
        body: &v,
        session: (flags & 2 == 2).then_some("session-1"),
        dry_run: true,
        ..Default::default()
    };
    match rt.block_on(g.route(&req)) {
        Ok(r) => assert!(!r.order.is_empty(), "a decision names a pod"),
        Err(e) => assert!(e.status.is_client_error() || e.status.is_server_error(), "{}", e.status),
    }
});
