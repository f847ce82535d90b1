//! Live ingestion of vLLM's own `BlockPool` trace over real ZMQ sockets, with the bad
//! things a network does: batches lost on the way (sequence gaps repaired from the
//! publisher's ROUTER replay buffer), an old batch arriving again (seen as an engine
//! restart: clear + replay from 0), and a router that starts after the pod has published
//! (start-up replay, then the live stream joins and replays again). Copies are counted,
//! so a batch applied twice would leave the index short or long; after every step that
//! has been applied, each prompt's cached prefix in the index must equal vLLM's pool.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{EventApplier, InMemoryIndex, IndexConfig, KeyMode, Pods};
use kvroute_index_conformance::{held_prefix, vllm_pool_trace_runs};
use kvroute_ingest::{DialTarget, IngestConfig, Ingestor, Metrics};

enum Cmd {
    /// Buffer the batch for replay; send it live unless `live` is false (lost on the way).
    Publish { seq: u64, payload: Vec<u8>, live: bool },
    /// Send an already published batch live once more.
    Resend(u64),
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A vLLM-style publisher (PUB + ROUTER replay, `[topic, seq, payload]`, replies
/// `["", topic, seq, payload]` then the end marker) on its own thread.
fn publisher(pub_ep: String, router_ep: String, rx: Receiver<Cmd>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let ctx = zmq::Context::new();
        let pub_sock = ctx.socket(zmq::PUB).unwrap();
        pub_sock.set_linger(0).unwrap();
        pub_sock.bind(&pub_ep).unwrap();
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind(&router_ep).unwrap();
        let topic = b"kv@pod-a@m".to_vec();
        let mut buffer: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
        // Applies the commands sent so far; false once the test hung up.
        fn drain(rx: &Receiver<Cmd>, sock: &zmq::Socket, topic: &[u8], buffer: &mut VecDeque<(u64, Vec<u8>)>) -> bool {
            loop {
                match rx.try_recv() {
                    Ok(Cmd::Publish { seq, payload, live }) => {
                        if live {
                            sock.send_multipart([topic, &seq.to_be_bytes()[..], &payload[..]], 0).unwrap();
                        }
                        buffer.push_back((seq, payload));
                    }
                    Ok(Cmd::Resend(seq)) => {
                        if let Some((_, p)) = buffer.iter().find(|b| b.0 == seq) {
                            sock.send_multipart([topic, &seq.to_be_bytes()[..], &p[..]], 0).unwrap();
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                }
            }
        }
        loop {
            if !drain(&rx, &pub_sock, &topic, &mut buffer) {
                return;
            }
            if router.poll(zmq::POLLIN, 1).unwrap_or(0) > 0 {
                // A request that arrived during the poll must see every batch sent before it.
                if !drain(&rx, &pub_sock, &topic, &mut buffer) {
                    return;
                }
                while let Ok(req) = router.recv_multipart(zmq::DONTWAIT) {
                    let [id, _empty, start] = req.as_slice() else { continue };
                    let start = u64::from_be_bytes(start.as_slice().try_into().unwrap());
                    for (s, p) in buffer.iter().filter(|(s, _)| *s >= start) {
                        router.send_multipart([&id[..], b"", &topic[..], &s.to_be_bytes()[..], &p[..]], 0).unwrap();
                    }
                    router.send_multipart([&id[..], b"", b"", &u64::MAX.to_be_bytes()[..], b""], 0).unwrap();
                }
            }
        }
    })
}

/// Deterministic choices (no dependency on a random crate for three coin flips).
struct Lcg(u64);
impl Lcg {
    fn chance(&mut self, per_mille: u64) -> bool {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % 1000 < per_mille
    }
}

#[test]
fn live_ingestion_with_gaps_repeats_and_late_start_matches_vllm_pool() {
    let runs = vllm_pool_trace_runs();
    let run = &runs[0];
    let (pub_ep, router_ep) = (format!("tcp://127.0.0.1:{}", free_port()), format!("tcp://127.0.0.1:{}", free_port()));
    let (tx, rx): (Sender<Cmd>, Receiver<Cmd>) = channel();
    let publisher = publisher(pub_ep.clone(), router_ep.clone(), rx);

    let pods = Arc::new(Pods::new());
    let pod = pods.intern("pod-a").unwrap();
    let applier = Arc::new(EventApplier::new(InMemoryIndex::new(IndexConfig::default()), KeyMode::Engine));
    let cfg = IngestConfig {
        bind: vec![],
        connect: vec![DialTarget { pod: "pod-a".into(), endpoint: pub_ep, replay: Some(router_ep) }],
        ..Default::default()
    };
    let keys: Vec<&[u64]> = run.prompts.iter().map(|p| p.1.as_slice()).collect();
    let mut expect = vec![0usize; keys.len()];
    let mut rng = Lcg(7);
    let (mut seq, mut lost, mut resent, mut checked) = (0u64, 0, 0, 0);
    let mut ingestor = None;
    // The router starts after this many steps: it replays what was published so far.
    let late_start = 60;
    for (n, step) in run.steps.iter().enumerate() {
        if n == late_start {
            let (_, batches) = Ingestor::replay_dial_targets(&cfg, &applier, &pods, None);
            assert_eq!(batches as u64, seq, "start-up replay applies every published batch once");
            let registry = prometheus::Registry::new();
            ingestor =
                Some(Ingestor::start(&cfg, applier.clone(), pods.clone(), Metrics::new(&registry).unwrap()).unwrap());
            std::thread::sleep(Duration::from_millis(200)); // the SUB socket connects
        }
        for &(i, v) in &step.changed {
            expect[i] = v;
        }
        let Some(payload) = &step.payload else { continue };
        let live = n < late_start || n + 1 == run.steps.len() || !rng.chance(60);
        lost += !live as u32;
        tx.send(Cmd::Publish { seq, payload: payload.clone(), live }).unwrap();
        if n > late_start && seq > 3 && rng.chance(15) {
            // An old batch again: a restart to the subscriber (clear, replay from 0).
            tx.send(Cmd::Resend(seq - 3)).unwrap();
            resent += 1;
        }
        if n >= late_start && live {
            let deadline = Instant::now() + Duration::from_secs(20);
            while applier.applied_seq(pod) != Some(seq) {
                assert!(
                    Instant::now() < deadline,
                    "step {n}: batch {seq} not applied (at {:?})",
                    applier.applied_seq(pod)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // A resent batch triggers a replay after this one; let it settle.
            std::thread::sleep(Duration::from_millis(2));
            for i in 0..step.known {
                let got = held_prefix(applier.index(), pod, keys[i]);
                assert_eq!(
                    got, expect[i],
                    "step {n} (batch {seq}): prompt {i}: vLLM {} cached blocks, index {got}",
                    expect[i]
                );
            }
            checked += 1;
        }
        seq += 1;
    }
    assert!(lost > 5 && resent > 2 && checked > 100, "lost {lost}, resent {resent}, checked {checked}");
    let c = applier.counters();
    assert!(c.repeated_batches > 0, "replays repeated batches and they were skipped: {c:?}");
    drop(ingestor);
    drop(tx);
    publisher.join().unwrap();
}
