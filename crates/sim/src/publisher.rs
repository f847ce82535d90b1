//! The simulator's KV-event publisher, following vLLM's `ZmqEventPublisher`: a PUB socket
//! that binds when the endpoint contains `*` or `::` or is ipc/inproc and connects
//! otherwise; `[topic, seq (8 bytes BE), msgpack batch]` messages with seq from 0; the
//! events gathered since the last send form one batch (one engine step); an optional
//! ROUTER replay endpoint serves the last `buffer_steps` batches.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvroute_events::{encode_batch, EventBatch, KvEvent, WireFormat};
use tracing::{debug, warn};

use crate::config::KvEventsConfig;

pub struct Publisher {
    pub cfg: KvEventsConfig,
    pub format: WireFormat,
    pub rank: u16,
}

/// vLLM's rule for whether the PUB socket binds.
pub fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// vLLM offsets a data-parallel rank's tcp ports by the rank.
fn offset(endpoint: &str, rank: u16) -> String {
    if rank == 0 {
        return endpoint.to_string();
    }
    match endpoint.rsplit_once(':') {
        Some((head, port)) if endpoint.starts_with("tcp://") => match port.parse::<u16>() {
            Ok(p) if p != 0 => format!("{head}:{}", p.saturating_add(rank)),
            _ => endpoint.to_string(),
        },
        _ if endpoint.starts_with("inproc://") => format!("{endpoint}_dp{rank}"),
        _ => endpoint.to_string(),
    }
}

impl Publisher {
    /// Opens the sockets (errors are returned, so a bad endpoint fails at startup).
    pub fn open(&self, ctx: &zmq::Context) -> Result<(zmq::Socket, Option<zmq::Socket>), zmq::Error> {
        let pub_sock = ctx.socket(zmq::PUB)?;
        pub_sock.set_sndhwm(self.cfg.hwm)?;
        pub_sock.set_linger(0)?;
        let ep = offset(&self.cfg.endpoint, self.rank);
        if binds(&ep) {
            pub_sock.bind(&ep)?;
        } else {
            pub_sock.connect(&ep)?;
        }
        let router = match &self.cfg.replay_endpoint {
            Some(r) => {
                let s = ctx.socket(zmq::ROUTER)?;
                s.set_linger(0)?;
                s.bind(&offset(r, self.rank))?;
                Some(s)
            }
            None => None,
        };
        Ok((pub_sock, router))
    }

    /// Runs until the event channel closes.
    pub fn run(self, pub_sock: zmq::Socket, router: Option<zmq::Socket>, rx: Receiver<Vec<KvEvent>>) {
        let topic = self.cfg.topic.as_bytes().to_vec();
        let mut seq: u64 = 0;
        let mut buffer: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        let wait = if router.is_some() { Duration::from_millis(5) } else { Duration::from_millis(50) };
        loop {
            let first = match rx.recv_timeout(wait) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if let Some(mut events) = first {
                while let Ok(more) = rx.try_recv() {
                    events.extend(more);
                }
                let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                let batch = EventBatch { ts, events, data_parallel_rank: Some(self.rank as i64), unknown_events: 0 };
                let payload = encode_batch(&batch, self.format);
                if let Err(e) = pub_sock.send_multipart([&topic[..], &seq.to_be_bytes()[..], &payload[..]], 0) {
                    warn!("cannot publish KV events: {e}");
                }
                debug!(seq, bytes = payload.len(), "published a KV-event batch");
                buffer.push_back((seq, payload));
                if buffer.len() > self.cfg.buffer_steps.max(1) {
                    buffer.pop_front();
                }
                seq += 1;
            }
            if let Some(r) = &router {
                while let Ok(req) = r.recv_multipart(zmq::DONTWAIT) {
                    self.serve_replay(r, &req, &buffer, &topic);
                }
            }
        }
    }

    fn serve_replay(&self, r: &zmq::Socket, req: &[Vec<u8>], buffer: &VecDeque<(u64, Vec<u8>)>, topic: &[u8]) {
        // [identity, "", start_seq (8 bytes)]; anything else is ignored, as vLLM does.
        let [id, empty, start] = req else { return };
        let Ok(start) = <[u8; 8]>::try_from(start.as_slice()) else { return };
        if !empty.is_empty() {
            return;
        }
        let start = u64::from_be_bytes(start);
        // ≤ 0.25 replies are ["", seq, payload]; from 0.26 ["", topic, seq, payload]. The
        // array event format stands for the older engines.
        let old = self.format == WireFormat::Array;
        let send = |seq: u64, payload: &[u8]| {
            let s = seq.to_be_bytes();
            let res = if old {
                r.send_multipart([&id[..], b"", &s[..], payload], 0)
            } else {
                let t: &[u8] = if seq == u64::MAX { b"" } else { topic };
                r.send_multipart([&id[..], b"", t, &s[..], payload], 0)
            };
            if let Err(e) = res {
                warn!("replay reply failed: {e}");
            }
        };
        for (s, p) in buffer.iter().filter(|(s, _)| *s >= start) {
            send(*s, p);
        }
        send(u64::MAX, b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_bind_rule_and_rank_offsets() {
        assert!(binds("tcp://*:5557"));
        assert!(binds("tcp://[::]:5557"));
        assert!(binds("ipc:///tmp/x"));
        assert!(!binds("tcp://127.0.0.1:5557"));
        assert_eq!(offset("tcp://127.0.0.1:5557", 2), "tcp://127.0.0.1:5559");
        assert_eq!(offset("inproc://ev", 1), "inproc://ev_dp1");
        assert_eq!(offset("tcp://*:0", 1), "tcp://*:0");
    }
}
