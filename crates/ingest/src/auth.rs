//! Who may publish to a bound SUB socket: a ZAP handler (ZeroMQ's authentication
//! protocol, RFC 27, on `inproc://zeromq.zap.01`) checks each connecting publisher's
//! source address against an allow-list and, with CurveZMQ on, its public key against
//! another. A refused publisher's connection is closed by libzmq before any message.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use tracing::warn;

use crate::ratelog::RateLog;
use crate::stats::Metrics;

/// The ZAP domain kvroute's bound sockets use (ZAP is consulted only with one set).
pub(crate) const ZAP_DOMAIN: &str = "kvroute";

/// An allowed source: an address or a CIDR network (`10.0.0.0/8`, `fd00::/8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("not an IP address or network: {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("bad prefix in {s:?}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
        bits(ip) & mask == bits(self.addr) & mask
    }
}

/// What the ZAP handler allows; an empty list allows anything on that criterion.
pub(crate) struct Policy {
    pub sources: Vec<Net>,
    /// Allowed CurveZMQ client public keys (32 bytes each); checked for CURVE handshakes.
    pub keys: Vec<Vec<u8>>,
}

impl Policy {
    fn allows(&self, address: &str, mechanism: &[u8], credentials: &[Vec<u8>]) -> Result<(), String> {
        if !self.sources.is_empty() {
            let ip: Option<IpAddr> = address.parse().ok();
            if !ip.is_some_and(|ip| self.sources.iter().any(|n| n.contains(ip))) {
                return Err(format!("source address {address:?} not allowed"));
            }
        }
        if mechanism == b"CURVE" && !self.keys.is_empty() {
            let key = credentials.first().map(Vec::as_slice).unwrap_or_default();
            if !self.keys.iter().any(|k| k == key) {
                let z85 = zmq::z85_encode(key).unwrap_or_default();
                return Err(format!("publisher key {z85:?} from {address} not allowed"));
            }
        }
        Ok(())
    }
}

/// Binds the ZAP handler in `ctx` (before any socket that uses it binds) and answers on
/// a thread until `stop`.
pub(crate) fn start_zap(
    ctx: &zmq::Context,
    policy: Policy,
    stop: Arc<AtomicBool>,
    metrics: Metrics,
    log: Arc<RateLog>,
) -> Result<std::thread::JoinHandle<()>, crate::IngestError> {
    let ep = "inproc://zeromq.zap.01";
    let err = |source| crate::IngestError::Socket { endpoint: ep.into(), source };
    let sock = ctx.socket(zmq::REP).map_err(err)?;
    sock.set_linger(0).map_err(err)?;
    sock.bind(ep).map_err(err)?;
    let t = std::thread::Builder::new().name("kv-zap".into()).spawn(move || {
        while !stop.load(Relaxed) {
            match sock.poll(zmq::POLLIN, 100) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!("zap poll failed: {e}");
                    return;
                }
            }
            let Ok(req) = sock.recv_multipart(0) else { continue };
            let empty = Vec::new();
            let frame = |n: usize| req.get(n).unwrap_or(&empty);
            let request_id = frame(1).clone();
            let address = String::from_utf8_lossy(frame(3)).into_owned();
            let verdict = if frame(0).as_slice() != b"1.0" || frame(2).as_slice() != ZAP_DOMAIN.as_bytes() {
                Err("bad ZAP request".to_string())
            } else {
                policy.allows(&address, frame(5), req.get(6..).unwrap_or_default())
            };
            let (code, text) = match &verdict {
                Ok(()) => ("200", "OK"),
                Err(why) => {
                    metrics.auth_denied.inc();
                    log.note("auth_denied", format_args!("publisher refused: {why}"));
                    ("400", "not allowed")
                }
            };
            let reply: [&[u8]; 6] = [b"1.0", &request_id, code.as_bytes(), text.as_bytes(), b"", b""];
            if let Err(e) = sock.send_multipart(reply, 0) {
                warn!("zap reply failed: {e}");
            }
        }
    })?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = Net::parse("10.0.0.0/8").unwrap();
        assert!(n.contains("10.2.3.4".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one = Net::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Net::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("pod-a").is_err());
    }
}
