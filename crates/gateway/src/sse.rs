//! Server-sent events, re-cut at their boundaries: a body stream mapped event by event, so
//! an event split across chunks is seen whole (P/D's usage merge, hit attribution's usage
//! tap). Every byte outside the events passes unchanged; events the map keeps are given
//! back as it returns them.

use axum::body::Bytes;
use bytes::BytesMut;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};

/// The event boundary (`\n\n`), built once (a searcher costs microseconds to build).
static BOUNDARY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));

/// `body` with each event (`…\n\n`) replaced by `f(event)`; `None` drops the event. A
/// trailing partial event (the body ended mid-event) passes unchanged; an error from the
/// body is passed on and ends the stream.
pub fn map_events<S, E, F>(body: S, f: F) -> BoxStream<'static, Result<Bytes, E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
    F: FnMut(Bytes) -> Option<Bytes> + Send + 'static,
{
    struct St<S, F> {
        body: S,
        /// The chunk being cut while no partial event is carried (events are slices of it).
        cur: Bytes,
        /// A partial event and what arrived after it (copied until it is cut).
        carry: Cutter,
        done: bool,
        f: F,
    }
    let st = St { body: Box::pin(body), cur: Bytes::new(), carry: Cutter::default(), done: false, f };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            let event = if !st.carry.is_empty() {
                st.carry.next_event()
            } else if let Some(end) = BOUNDARY.find(&st.cur) {
                // Whole events straight out of the chunk, without a copy (the usual case:
                // engines write an event per chunk).
                Some(st.cur.split_to(end + 2))
            } else {
                st.carry.extend(&std::mem::take(&mut st.cur));
                None
            };
            if let Some(event) = event {
                match (st.f)(event) {
                    Some(out) => return Some((Ok(out), st)),
                    None => continue,
                }
            }
            if st.done {
                let rest = st.carry.rest();
                return (!rest.is_empty()).then_some((Ok(rest), st));
            }
            match st.body.next().await {
                Some(Ok(b)) if st.carry.is_empty() => st.cur = b,
                Some(Ok(b)) => st.carry.extend(&b),
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => st.done = true,
            }
        }
    })
    .boxed()
}

/// Cuts bytes handed in piece by piece into whole events: [`map_events`]'s carry, and the
/// ext_proc door's cutter (it gets chunks one at a time): `push` returns the events a chunk
/// completed and keeps a partial one; `rest` gives back what is left when the body ends.
#[derive(Default)]
pub struct Cutter {
    buf: BytesMut,
    /// Where the search for the next boundary resumes (bytes before it have none).
    scanned: usize,
}

impl Cutter {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.extend(chunk);
        std::iter::from_fn(|| self.next_event()).collect()
    }

    fn extend(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole event, if one has arrived.
    fn next_event(&mut self) -> Option<Bytes> {
        let from = self.scanned.saturating_sub(1).min(self.buf.len());
        match BOUNDARY.find(&self.buf[from..]) {
            Some(p) => {
                self.scanned = 0;
                Some(self.buf.split_to(from + p + 2).freeze())
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// The partial event left (the body ended mid-event), if any.
    pub fn rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }
}

/// The JSON of an event's `data:` line when it is an object (`data: {...}`).
pub fn event_json(event: &[u8]) -> Option<serde_json::Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.trim_end().strip_prefix("data:")?.trim();
    data.starts_with('{').then(|| serde_json::from_str(data).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(chunks: &[&str], f: impl FnMut(Bytes) -> Option<Bytes> + Send + 'static) -> Vec<String> {
        let owned: Vec<Result<Bytes, ()>> = chunks.iter().map(|c| Ok(Bytes::from(c.to_string()))).collect();
        let out: Vec<_> = map_events(futures_util::stream::iter(owned), f).collect().await;
        out.into_iter().map(|r| String::from_utf8(r.unwrap().to_vec()).unwrap()).collect()
    }

    #[tokio::test]
    async fn events_split_across_chunks_are_seen_whole_and_can_be_dropped() {
        let chunks = ["data: {\"a\":1}\n", "\ndata: {\"b\"", ":2}\n\ndata: [DONE]\n\n", "tail"];
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let s = seen.clone();
        let out = run(&chunks, move |e| {
            s.lock().push(String::from_utf8_lossy(&e).to_string());
            (!e.starts_with(b"data: {\"b\"")).then_some(e)
        })
        .await;
        assert_eq!(out, ["data: {\"a\":1}\n\n", "data: [DONE]\n\n", "tail"]);
        assert_eq!(seen.lock().len(), 3);
        assert_eq!(event_json(b"data: {\"b\":2}\n\n"), Some(serde_json::json!({"b": 2})));
        assert_eq!(event_json(b"data: [DONE]\n\n"), None);
    }

    #[tokio::test]
    async fn several_events_in_one_chunk_and_a_boundary_split_between_chunks() {
        let chunks = ["data: 1\n\ndata: 2\n\ndata: 3", "\n", "\ndata: 4\n\n", "data: 5\n\ndata"];
        let out = run(&chunks, Some).await;
        let want = ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n", "data: 4\n\n", "data: 5\n\n", "data"];
        assert_eq!(out, want);
        // The chunk-at-a-time cutter cuts the same events.
        let mut c = Cutter::default();
        let mut cut: Vec<String> =
            chunks.iter().flat_map(|ch| c.push(ch.as_bytes())).map(|e| String::from_utf8_lossy(&e).into()).collect();
        cut.push(String::from_utf8_lossy(&c.rest()).into());
        assert_eq!(cut, want);
        assert!(c.rest().is_empty());
    }
}
