//! The ext_proc door's Prometheus metrics (registered with the router's registry).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

pub struct ExtProcMetrics {
    requests: IntCounterVec,
    pd: IntCounterVec,
    pub responses: IntCounterVec,
    pub decision: Histogram,
    prompt_tokens: IntCounter,
    cached_tokens: IntCounter,
}

impl ExtProcMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("kvroute_extproc_requests_total", "ext_proc requests by outcome"),
            &["outcome"],
        )?;
        let pd = IntCounterVec::new(
            Opts::new(
                "kvroute_extproc_pd_decisions_total",
                "P/D decisions of routed requests (a profile with a prefill stage): split (x-prefiller-host-port \
                 named the prefill pod) or decode_only",
            ),
            &["decision"],
        )?;
        let responses = IntCounterVec::new(
            Opts::new("kvroute_extproc_responses_total", "Upstream responses seen by ext_proc, by status"),
            &["status"],
        )?;
        let decision = Histogram::with_opts(
            HistogramOpts::new(
                "kvroute_extproc_decision_seconds",
                "From the request headers to the routing answer (body receipt included)",
            )
            .buckets(vec![1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0]),
        )?;
        let prompt_tokens = IntCounter::new(
            "kvroute_extproc_prompt_tokens_total",
            "Prompt tokens reported in `usage` of responses through ext_proc",
        )?;
        let cached_tokens = IntCounter::new(
            "kvroute_extproc_cached_tokens_total",
            "Cached prompt tokens (`usage.prompt_tokens_details.cached_tokens`) of responses through ext_proc",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(pd.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        registry.register(Box::new(decision.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(cached_tokens.clone()))?;
        Ok(Self { requests, pd, responses, decision, prompt_tokens, cached_tokens })
    }

    pub fn outcome(&self, o: &str) {
        self.requests.with_label_values(&[o]).inc();
    }

    /// Counts a P/D decision (`split` or `decode_only`).
    pub fn pd(&self, decision: &str) {
        self.pd.with_label_values(&[decision]).inc();
    }

    /// Reads `usage` from a buffered JSON body or from the SSE `data:` events of a stream
    /// (the last event carrying it wins).
    pub fn usage(&self, body: &[u8]) {
        if let Some((p, c)) = usage(body) {
            self.prompt_tokens.inc_by(p);
            self.cached_tokens.inc_by(c);
        }
    }
}

/// (prompt tokens, cached prompt tokens) from a response body.
pub fn usage(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let from = |v: &serde_json::Value| {
        let u = v.get("usage").filter(|u| u.is_object())?;
        let p = u.get("prompt_tokens")?.as_u64()?;
        // vLLM and OpenAI: `prompt_tokens_details` (llm-d's EPP reads a misspelt field).
        let c = u.pointer("/prompt_tokens_details/cached_tokens").and_then(|x| x.as_u64()).unwrap_or(0);
        Some((p, c))
    };
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        return from(&v);
    }
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| from(&v))
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_from_buffered_and_streamed_bodies() {
        let j = br#"{"choices":[],"usage":{"prompt_tokens":160,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":144}}}"#;
        assert_eq!(super::usage(j), Some((160, 144)));
        let sse = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"prompt_tokens_details\":null}}\n\ndata: [DONE]\n\n";
        assert_eq!(super::usage(sse), Some((20, 0)));
        assert_eq!(super::usage(b"not json"), None);
    }
}
