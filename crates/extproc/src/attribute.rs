//! Hit attribution and the traffic record on the ext_proc door: the same
//! [`kvroute_gateway::attribution`] as the HTTP gateway, fed from the response body chunks
//! Envoy streams through the door.
//!
//! Each response is read for the engine's `usage` (whole JSON bodies, or the SSE events of
//! a stream, cut at their boundaries). When the door asked the engine for a stream's usage
//! on the client's behalf — only possible where it re-sends both bodies itself, Envoy's
//! `FULL_DUPLEX_STREAMED` in both directions, the Gateway API Inference Extension's mode —
//! the final usage chunk is removed again, so the client's stream is what the engine would
//! have sent it. In other body modes a stream whose client did not ask for usage is counted
//! `unreported`.

use std::sync::Arc;

use kvroute_gateway::attribution::{Attribution, Prediction, Tap, Usage, UsageReader, MAX_USAGE_BODY};
use kvroute_gateway::sse::Cutter;

/// One response on its way back through the door.
pub(crate) struct ResponseReader {
    /// Counts the request when dropped (`None`: attribution off or not routed).
    tap: Option<Tap>,
    reader: UsageReader,
    /// Re-cut the stream (the door re-sends the body, minus the injected usage chunk).
    strip: bool,
    sse: bool,
    cutter: Cutter,
    whole: Vec<u8>,
    done: bool,
}

impl ResponseReader {
    /// `prediction` to attribute (if any), the response `status` and content type; `strip`
    /// when the door asked for the usage chunk itself.
    pub fn new(
        attribution: &Arc<Attribution>,
        prediction: Option<Prediction>,
        status: u16,
        content_type: Option<&str>,
        strip: bool,
    ) -> Self {
        let sse = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
        Self {
            tap: prediction.map(|p| Tap::new(attribution.clone(), p, status)),
            reader: UsageReader::new(strip && sse),
            strip: strip && sse,
            sse,
            cutter: Cutter::default(),
            whole: Vec::new(),
            done: false,
        }
    }

    /// Reads a chunk. Returns what to send on instead of it when the stream is re-cut
    /// (complete events only; `None`: the chunk passes as it is); at the end the usage, if
    /// the body carried one.
    pub fn chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> (Option<Vec<u8>>, Option<Usage>) {
        if self.done {
            return (None, None);
        }
        let mut out = None;
        if self.sse {
            let mut keep = Vec::new();
            for event in self.cutter.push(chunk) {
                if let Some(e) = self.reader.event(event) {
                    keep.extend_from_slice(&e);
                }
            }
            if end_of_stream {
                keep.extend_from_slice(&self.cutter.rest());
            }
            out = self.strip.then_some(keep);
        } else if self.whole.len() + chunk.len() <= MAX_USAGE_BODY {
            self.whole.extend_from_slice(chunk);
        }
        if !end_of_stream {
            return (out, None);
        }
        self.done = true;
        let usage = if self.sse { self.reader.usage() } else { Usage::of_body(&self.whole) };
        if let Some(mut tap) = self.tap.take() {
            tap.set_usage(usage);
        }
        (out, usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction() -> Prediction {
        let p = Prediction { request_id: "r1".into(), pod: "p".into(), stream: true, ..Default::default() };
        Prediction { prompt_tokens: 160, predicted_tokens: 144, best_tokens: 144, ..p }
    }

    const STREAM: [&str; 3] = [
        "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":160,",
        "\"completion_tokens\":1,\"prompt_tokens_details\":{\"cached_tokens\":144}}}\n",
        "\ndata: [DONE]\n\n",
    ];

    fn attribution() -> Arc<Attribution> {
        Arc::new(Attribution::new(&prometheus::Registry::new(), 4).unwrap())
    }

    #[test]
    fn a_stream_is_recut_without_the_injected_usage_chunk_and_attributed() {
        let a = attribution();
        let mut r = ResponseReader::new(&a, Some(prediction()), 200, Some("text/event-stream"), true);
        let mut sent = Vec::new();
        let mut usage = None;
        for (i, c) in STREAM.iter().enumerate() {
            let (out, u) = r.chunk(c.as_bytes(), i == STREAM.len() - 1);
            sent.extend(out.expect("re-cut"));
            usage = u;
        }
        assert_eq!(sent, b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: [DONE]\n\n");
        assert_eq!(usage.and_then(|u| u.cached_tokens), Some(144));
        let recent = a.recent(4);
        assert_eq!(recent["decisions"][0]["outcome"], "hit");
        assert_eq!(recent["decisions"][0]["request_id"], "r1");
    }

    #[test]
    fn a_client_that_asked_for_usage_keeps_it_and_json_bodies_are_read_whole() {
        let a = attribution();
        let mut r = ResponseReader::new(&a, Some(prediction()), 200, Some("text/event-stream"), false);
        let outs: Vec<_> = STREAM.iter().enumerate().map(|(i, c)| r.chunk(c.as_bytes(), i == 2)).collect();
        assert!(outs.iter().all(|(o, _)| o.is_none()), "passed through unchanged");
        assert_eq!(outs[2].1.and_then(|u| u.prompt_tokens), Some(160));
        let body = br#"{"choices":[],"usage":{"prompt_tokens":160,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let mut r = ResponseReader::new(&a, Some(prediction()), 200, Some("application/json"), true);
        assert_eq!(r.chunk(&body[..20], false), (None, None));
        let (out, u) = r.chunk(&body[20..], true);
        assert_eq!((out, u.and_then(|u| u.cached_tokens)), (None, Some(0)));
        // 144 predicted, none found: a stale index.
        assert_eq!(a.recent(4)["decisions"][0]["outcome"], "stale_index");
        // A response that never ends (Envoy closed the stream) is still counted, unreported.
        drop(ResponseReader::new(&a, Some(prediction()), 200, Some("application/json"), false));
        assert_eq!(a.recent(4)["decisions"][0]["outcome"], "unreported");
    }
}
