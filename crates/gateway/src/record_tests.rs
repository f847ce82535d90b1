use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use super::*;

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kvroute-record-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn salt(s: &str) -> Salt {
    Salt::from_secret(s.as_bytes()).unwrap()
}

fn entry(start: Instant, ms: u64, keys: &[u64]) -> TraceEntry {
    TraceEntry {
        arrival: start + std::time::Duration::from_millis(ms),
        input_length: keys.len() as u64 * 16 + 3,
        output_length: 7,
        keys: keys.into(),
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v["hash_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn metric(r: &Registry, name: &str) -> u64 {
    r.gather().iter().find(|f| f.name() == name).map_or(0, |f| f.get_metric()[0].get_counter().get_value() as u64)
}

/// Records `entries` with `salt` into a fresh file; returns the lines.
fn record_all(tag: &str, salt: Salt, entries: &[&[u64]]) -> Vec<Value> {
    let dir = TempDir::new(tag);
    let path = dir.0.join("trace.jsonl");
    let rec = TraceRecorder::open(RecordConfig::new(path.clone(), salt, 16), &Registry::new()).unwrap();
    for (i, k) in entries.iter().enumerate() {
        rec.record(entry(rec.start(), i as u64, k));
    }
    rec.flush();
    lines(&path)
}

#[test]
fn lines_are_mooncake_with_lengths_timestamps_and_one_id_per_key() {
    let dir = TempDir::new("format");
    let path = dir.0.join("t.jsonl");
    let reg = Registry::new();
    let rec = TraceRecorder::open(RecordConfig::new(path.clone(), salt("0123456789abcdef-format"), 16), &reg).unwrap();
    rec.record(entry(rec.start(), 1500, &[11, 12, 13]));
    rec.record(TraceEntry { arrival: rec.start(), input_length: 5, output_length: 1, keys: Arc::from(vec![]) });
    rec.flush();
    let l = lines(&path);
    assert_eq!(l.len(), 2);
    let keys: Vec<&str> = l[0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["timestamp", "input_length", "output_length", "hash_ids"]);
    assert_eq!(
        (l[0]["timestamp"].as_u64(), l[0]["input_length"].as_u64(), l[0]["output_length"].as_u64()),
        (Some(1500), Some(51), Some(7))
    );
    assert_eq!(ids(&l[0]).len(), 3);
    assert!(ids(&l[0]).iter().all(|id| ![11, 12, 13].contains(id)), "ids are not the keys themselves");
    assert_eq!((l[1]["timestamp"].as_u64(), ids(&l[1])), (Some(0), vec![]));
    assert_eq!(metric(&reg, "kvroute_record_entries_total"), 2);
    assert_eq!(metric(&reg, "kvroute_record_dropped_total"), 0);
}

#[test]
fn same_salt_same_ids_other_salt_disjoint_ids() {
    let keys: Vec<u64> = (1..=200).collect();
    let a = record_all("salt-a", salt("deployment-one-secret"), &[&keys]);
    let b = record_all("salt-b", salt("deployment-one-secret"), &[&keys]);
    let c = record_all("salt-c", salt("deployment-two-secret"), &[&keys]);
    assert_eq!(ids(&a[0]), ids(&b[0]), "replicas / restarts sharing a salt file agree");
    let ca: HashSet<u64> = ids(&a[0]).into_iter().collect();
    assert_eq!(ca.len(), 200);
    assert!(ids(&c[0]).iter().all(|id| !ca.contains(id)), "another deployment's ids share none");
    // A random salt is another salt every time.
    let r1 = record_all("salt-r1", Salt::random().unwrap(), &[&keys]);
    let r2 = record_all("salt-r2", Salt::random().unwrap(), &[&keys]);
    assert!(ids(&r1[0]).iter().all(|id| !ids(&r2[0]).contains(id)));
}

#[test]
fn prefix_sharing_is_preserved_and_nothing_else() {
    // Chained keys: the first two blocks shared, then different.
    let l = record_all("chain", salt("a-salt-of-sixteen-bytes"), &[&[1, 2, 3, 4], &[1, 2, 9, 10], &[5, 6]]);
    let (a, b, c) = (ids(&l[0]), ids(&l[1]), ids(&l[2]));
    assert_eq!(a[..2], b[..2]);
    assert!(a[2..].iter().all(|x| !b[2..].contains(x)));
    assert!(c.iter().all(|x| !a.contains(x) && !b.contains(x)));
}

#[test]
fn salt_files_need_sixteen_bytes_and_ignore_a_trailing_newline() {
    assert!(Salt::from_secret(b"short\n").is_err());
    assert!(Salt::from_secret(b"fifteen-bytes!!").is_err());
    assert_eq!(Salt::from_secret(b"0123456789abcdef\n"), Salt::from_secret(b"0123456789abcdef"));
    assert_ne!(Salt::from_secret(b"0123456789abcdef"), Salt::from_secret(b"0123456789abcdeg"));
    let dir = TempDir::new("saltfile");
    let p = dir.0.join("salt");
    std::fs::write(&p, "00112233445566778899aabbccddeeff\n").unwrap();
    assert_eq!(Salt::from_file(&p).unwrap(), Salt::from_secret(b"00112233445566778899aabbccddeeff").unwrap());
    assert!(Salt::from_file(&dir.0.join("missing")).unwrap_err().contains("cannot read"));
    assert!(format!("{:?}", Salt::from_file(&p).unwrap()) == "Salt(…)", "Debug shows no secret");
}

#[test]
fn rotates_by_size_and_keeps_n_files() {
    let dir = TempDir::new("rotate");
    let path = dir.0.join("t.jsonl");
    let reg = Registry::new();
    let cfg =
        RecordConfig { max_bytes: 400, keep: 2, ..RecordConfig::new(path.clone(), salt("rotation-test-salt"), 16) };
    let rec = TraceRecorder::open(cfg, &reg).unwrap();
    for i in 0..40u64 {
        rec.record(entry(rec.start(), i, &[i, i + 1, i + 2]));
    }
    rec.flush();
    let numbered = |i: usize| dir.0.join(format!("t.jsonl.{i}"));
    assert!(numbered(1).exists() && numbered(2).exists());
    assert!(!numbered(3).exists(), "only `keep` rotated files stay");
    let mut seen = vec![];
    for p in [numbered(2), numbered(1), path.clone()] {
        assert!(std::fs::metadata(&p).unwrap().len() <= 400, "{} over max_bytes", p.display());
        seen.extend(lines(&p).iter().map(|v| v["timestamp"].as_u64().unwrap()));
    }
    // The files, oldest first, hold the newest entries in order, ending with the last one.
    assert_eq!(seen.last(), Some(&39));
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    let rotations = metric(&reg, "kvroute_record_rotations_total");
    assert!(rotations >= 3, "{rotations}");
    assert_eq!(metric(&reg, "kvroute_record_entries_total"), 40);
    assert_eq!(metric(&reg, "kvroute_record_errors_total"), 0);
}

#[test]
fn a_file_from_an_earlier_process_is_rotated_away() {
    let dir = TempDir::new("reopen");
    let path = dir.0.join("t.jsonl");
    std::fs::write(&path, "{\"old\":1}\n").unwrap();
    let rec =
        TraceRecorder::open(RecordConfig::new(path.clone(), salt("reopen-test-salt!"), 16), &Registry::new()).unwrap();
    rec.record(entry(rec.start(), 3, &[1]));
    rec.flush();
    assert_eq!(std::fs::read_to_string(dir.0.join("t.jsonl.1")).unwrap(), "{\"old\":1}\n");
    assert_eq!(lines(&path).len(), 1);
}

#[test]
fn a_full_queue_drops_and_counts_without_waiting() {
    // A recorder whose writer never reads: the queue (1 entry) fills at once.
    let reg = Registry::new();
    let (tx, _rx) = mpsc::sync_channel(1);
    let rec = TraceRecorder { tx, start: Instant::now(), metrics: RecordMetrics::new(&reg).unwrap(), block_tokens: 16 };
    let t = Instant::now();
    for i in 0..5 {
        rec.record(entry(rec.start(), i, &[i]));
    }
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(metric(&reg, "kvroute_record_dropped_total"), 4);
}

#[test]
fn metric_names_collide_on_a_second_registration() {
    // Registered on the gateway's registry: a second recorder there is refused, not silent.
    let reg = Registry::new();
    let dir = TempDir::new("twice");
    let cfg = RecordConfig::new(dir.0.join("a"), salt("twice-registered-salt"), 16);
    let _a = TraceRecorder::open(cfg.clone(), &reg).unwrap();
    assert!(TraceRecorder::open(RecordConfig { path: dir.0.join("b"), ..cfg }, &reg).is_err());
}

#[test]
fn failures_are_counted_and_writing_resumes_when_the_file_can_be_opened_again() {
    let dir = TempDir::new("fail");
    let sub = dir.0.join("traces");
    std::fs::create_dir_all(&sub).unwrap();
    let path = sub.join("t.jsonl");
    let reg = Registry::new();
    let cfg = RecordConfig { max_bytes: 100, ..RecordConfig::new(path.clone(), salt("failure-test-salt!"), 16) };
    let rec = TraceRecorder::open(cfg, &reg).unwrap();
    rec.record(entry(rec.start(), 1, &[1, 2]));
    rec.flush();
    // The directory goes away: the next rotation and every open fail, nothing blocks.
    std::fs::remove_dir_all(&sub).unwrap();
    for i in 2..6 {
        rec.record(entry(rec.start(), i, &[i, i + 1]));
    }
    rec.flush();
    let errors = metric(&reg, "kvroute_record_errors_total");
    assert!(errors >= 4, "{errors}");
    assert_eq!(metric(&reg, "kvroute_record_entries_total"), 1);
    // Back: the next entry opens the file again.
    std::fs::create_dir_all(&sub).unwrap();
    rec.record(entry(rec.start(), 9, &[7]));
    rec.flush();
    assert_eq!(lines(&path).iter().map(|v| v["timestamp"].as_u64().unwrap()).collect::<Vec<_>>(), [9]);
    assert_eq!(metric(&reg, "kvroute_record_entries_total"), 2);
}
