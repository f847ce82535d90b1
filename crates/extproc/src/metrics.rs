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

    /// Counts a response's `usage` (prompt and cached prompt tokens), when it had one.
    pub fn usage(&self, usage: Option<kvroute_gateway::attribution::Usage>) {
        if let Some(u) = usage.filter(|u| u.prompt_tokens.is_some()) {
            self.prompt_tokens.inc_by(u.prompt_tokens.unwrap_or(0));
            self.cached_tokens.inc_by(u.cached_tokens.unwrap_or(0));
        }
    }
}
