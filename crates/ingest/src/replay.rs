//! Client for vLLM's ROUTER replay endpoint.
//!
//! Request (from a DEALER): `["", start_seq as 8 bytes big-endian]`. Replies: one message
//! per buffered batch with `seq >= start`, in order — `["", seq, payload]` up to vLLM 0.25,
//! `["", topic, seq, payload]` from 0.26 — then an end marker whose seq is 2^64−1.

use std::time::{Duration, Instant};

/// Why a replay did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply framing ({0} frames)")]
    Framing(usize),
}

/// How a completed replay went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub batches: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Replays from `endpoint` starting at `from`, handing each `(seq, payload)` to `f` in
/// order. `idle` bounds the wait for each reply, `total` the whole replay; a reply frame
/// over `max_frame_bytes` makes libzmq drop the connection (the replay then times out).
pub fn replay(
    ctx: &zmq::Context,
    endpoint: &str,
    from: u64,
    idle: Duration,
    total: Duration,
    max_frame_bytes: usize,
    mut f: impl FnMut(u64, &[u8]),
) -> Result<ReplayOutcome, ReplayError> {
    let sock = ctx.socket(zmq::DEALER)?;
    sock.set_linger(0)?;
    sock.set_maxmsgsize(max_frame_bytes.min(i64::MAX as usize) as i64)?;
    sock.set_rcvtimeo(idle.as_millis().min(i32::MAX as u128) as i32)?;
    sock.connect(endpoint)?;
    sock.send_multipart([&b""[..], &from.to_be_bytes()[..]], 0)?;
    let deadline = Instant::now() + total;
    let mut out = ReplayOutcome::default();
    loop {
        if Instant::now() > deadline {
            return Err(ReplayError::Timeout(total));
        }
        let frames = match sock.recv_multipart(0) {
            Ok(f) => f,
            Err(zmq::Error::EAGAIN) => return Err(ReplayError::Timeout(idle)),
            Err(e) => return Err(e.into()),
        };
        let (seq, payload) = match frames.as_slice() {
            [empty, seq, payload] if empty.is_empty() => (seq, payload),
            [empty, _topic, seq, payload] if empty.is_empty() => (seq, payload),
            other => return Err(ReplayError::Framing(other.len())),
        };
        let Ok(seq8) = <[u8; 8]>::try_from(seq.as_slice()) else { return Err(ReplayError::Framing(frames.len())) };
        let seq = u64::from_be_bytes(seq8);
        if seq == u64::MAX {
            return Ok(out);
        }
        out.batches += 1;
        out.first_seq.get_or_insert(seq);
        out.last_seq = Some(seq);
        f(seq, payload);
    }
}
