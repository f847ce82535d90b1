//! # kvroute-index-redis — the block index on Redis / Valkey
//!
//! Owns sharing the `block key → pods` record between router replicas through an
//! existing Redis or Valkey server, behind the same [`BlockIndex`] trait as the in-memory
//! index, so every scorer, the gateway and the ext_proc door run on it unchanged.
//!
//! **Layout** (`P` = the key prefix, default `kvr`):
//! * `P:b:<key as 16 hex digits>` — a STRING per block: `<pod name>|<tier id>=<epoch>;` per
//!   pod holding it (the pod's epoch when stored), `…=<epoch>:<copies>;` when the pod holds
//!   more than one copy (vLLM does not de-duplicate cached blocks: a store adds a copy, a
//!   remove takes one away, the entry goes with the last), so a whole prompt is one `MGET`;
//!   the Lua scripts that store and remove keep it well formed. Every write refreshes the
//!   key's TTL (`ttl`, default 1 h),
//!   so blocks no event mentions any more leave by themselves: memory is bounded by the
//!   fleet's recent working set, not by history.
//! * `P:epochs` — HASH pod name → epoch. Clearing a pod (`AllBlocksCleared`, pod restart)
//!   is one `HINCRBY`: entries stored under an older epoch are ignored by lookups and
//!   expire with their TTL — no `KEYS`/`SCAN` over the data.
//! * `P:counts` — HASH pod name → live entries (from `HSET`/`HDEL` replies; blocks that
//!   expire by TTL are not subtracted, so it is an upper bound after expiry).
//! * `P:seq` — HASH pod name → sequence number of the last event batch applied (since the
//!   pod's last clear). Copies are counted, so a batch applied twice would count twice:
//!   a replica replaying a pod's buffer (at start, after a Redis outage, on taking a
//!   lease over) skips the batches at or below it.
//!
//! **Round trips**: a lookup of a whole prompt is one pipeline (`HGETALL` of the epochs and
//! one `MGET` of every block key); a batch of stored or removed blocks is one Lua script call
//! (atomic: the entry counts stay exact whatever other replicas do meanwhile).
//!
//! **Redis Cluster** (`cluster`): the block keys spread over the cluster's slots, so the
//! index shards with it; a lookup is one pipeline of `GET`s sent to every node at once,
//! a write one Lua call per slot (see `conn`), the epochs and counts hashes live on one
//! node each. Moved slots are followed by the client.
//!
//! **Local cache** (opt-in, `cache_ttl`): the first `cache_prefix_blocks` (128) block
//! values of a lookup are reused for `cache_ttl`: hot shared prefixes skip most of the
//! transfer; this replica's writes invalidate at once, other replicas' show
//! within the bound (`cache_capacity` values at most).
//!
//! **Writers**: one per pod — only the replica holding a pod's lease in Redis
//! (`writer_lease`) writes that pod's events. Counting copies is not idempotent: if every
//! replica applied the same events, each copy would count once per replica (this was the
//! "active-active" mode before copies were counted). A replica that takes a lease over
//! replays the pod's buffer from the last batch the previous writer recorded in `P:seq`.
//! The one gap: a writer that dies between a batch's block writes and its `P:seq` update
//! leaves that batch to be applied again by its successor.
//!
//! **Speculative entries** (a replica's own routing decisions, seconds long) stay in a
//! local in-memory index and are merged into lookups; they are not shared.
//!
//! **When Redis is unreachable** lookups fall back to that local view, writes are
//! dropped, an error counter rises and a warning is logged (at most every 5 s); Redis is
//! retried every 500 ms. Events missed meanwhile come back as the pods publish again or
//! through their replay endpoints; stale entries expire by TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_index::{BlockIndex, InMemoryIndex, IndexConfig, IndexStats, PodEntry, PodId, Pods, TierId, MAX_TIERS};
use parking_lot::Mutex;

mod conn;

/// Stores one pod/tier on many blocks atomically, counting entries that were not live
/// (absent, or stored before the pod's current epoch). A block's value is a string of
/// `field=epoch;` entries. KEYS: [counts], block keys…; ARGV: 1 if KEYS[1] is the counts
/// key (one server) else 0 (cluster: the caller adds the returned change), pod name,
/// field, epoch, ttl.
const STORE_LUA: &str = r"
local first = 1 + tonumber(ARGV[1])
local added = 0
local epoch = tonumber(ARGV[4])
local pat = ARGV[3]:gsub('%p', '%%%0') .. '=(%d+):?(%d*);'
for i = first, #KEYS do
  local v = redis.call('GET', KEYS[i]) or ''
  local old, n = string.match(';' .. v, ';' .. pat)
  local copies = 1
  if old and tonumber(old) >= epoch then copies = (tonumber(n) or 1) + 1 else added = added + 1 end
  if old then v = (';' .. v):gsub(';' .. pat, ';', 1):sub(2) end
  local entry = ARGV[3] .. '=' .. ARGV[4] .. ';'
  if copies > 1 then entry = ARGV[3] .. '=' .. ARGV[4] .. ':' .. copies .. ';' end
  redis.call('SET', KEYS[i], v .. entry, 'EX', ARGV[5])
end
if first == 2 and added > 0 then redis.call('HINCRBY', KEYS[1], ARGV[2], added) end
return added";
static STORE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(STORE_LUA));

/// Takes one copy of each field away from many blocks atomically (an entry goes with its
/// last copy, a stale one at once), returning minus the live entries removed.
/// KEYS: [counts], block keys…; ARGV: counts flag (as for STORE), pod name, epoch, fields….
const REMOVE_LUA: &str = r"
local first = 1 + tonumber(ARGV[1])
local removed = 0
local epoch = tonumber(ARGV[3])
for i = first, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    v = ';' .. v
    local changed = false
    for j = 4, #ARGV do
      local pat = ';' .. ARGV[j]:gsub('%p', '%%%0') .. '=(%d+):?(%d*);'
      local old, n = string.match(v, pat)
      if old then
        local live = tonumber(old) >= epoch
        local left = 0
        if live then left = (tonumber(n) or 1) - 1 end
        if left > 0 then
          local e = ';' .. ARGV[j] .. '=' .. old .. ';'
          if left > 1 then e = ';' .. ARGV[j] .. '=' .. old .. ':' .. left .. ';' end
          v = v:gsub(pat, function() return e end, 1)
        else
          if live then removed = removed + 1 end
          v = v:gsub(pat, ';', 1)
        end
        changed = true
      end
    end
    if changed then
      if v == ';' then redis.call('DEL', KEYS[i]) else redis.call('SET', KEYS[i], v:sub(2), 'KEEPTTL') end
    end
  end
end
if first == 2 and removed > 0 then redis.call('HINCRBY', KEYS[1], ARGV[2], -removed) end
return -removed";
static REMOVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(REMOVE_LUA));

/// Takes or renews a writer lease. KEYS: the lease; ARGV: replica id, lease ms.
static LEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0",
    )
});

/// Redis backend settings.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` (Valkey speaks the same protocol); with `cluster`, one or
    /// more seed nodes separated by commas.
    pub url: String,
    /// The server is a Redis (or Valkey) Cluster: block keys spread over its slots.
    pub cluster: bool,
    /// Prefix of every key kvroute writes.
    pub prefix: String,
    /// Lifetime of a block key after its last write.
    pub ttl: Duration,
    /// Lifetime of local speculative entries.
    pub speculative_ttl: Duration,
    /// Connect / read / write timeout of one Redis call.
    pub timeout: Duration,
    /// Block values read from Redis are reused for this long (hot prefixes — a system
    /// prompt every request shares — skip most of the transfer); this replica's own writes
    /// invalidate them at once, other replicas' writes show within this bound. Zero (the
    /// default): off — on cold prompts the bookkeeping costs more than it saves.
    pub cache_ttl: Duration,
    /// Most block values cached.
    pub cache_capacity: usize,
    /// Only the first this many blocks of a prompt are cached: shared prefixes (system
    /// prompts, few-shot examples) sit at the start; tails are mostly unique.
    pub cache_prefix_blocks: usize,
    /// One writer per pod: a replica writes a pod's events only while it holds the pod's
    /// lease in Redis (`P:owner:<pod>`, renewed every third of this). Default 3 s: a pod's
    /// events pause for up to this long when its writer dies.
    pub writer_lease: Duration,
    /// This replica's name in the leases.
    pub replica_id: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            prefix: "kvr".into(),
            ttl: Duration::from_secs(3600),
            speculative_ttl: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            cache_ttl: Duration::ZERO,
            cache_capacity: 1 << 18,
            cache_prefix_blocks: 128,
            writer_lease: Duration::from_secs(3),
            replica_id: format!("replica-{}", std::process::id()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisIndexError {
    #[error("invalid Redis URL: {0}")]
    Url(#[from] redis::RedisError),
}

/// Block keys are already uniform hashes: one multiply spreads them (SipHash would cost
/// more than the lookup it serves).
#[derive(Default)]
struct KeyHasher(u64);
impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
type CacheMap = HashMap<u64, (Instant, Option<Arc<str>>), std::hash::BuildHasherDefault<KeyHasher>>;

type OnAcquire = Box<dyn Fn(&str) + Send + Sync>;

/// The shared index.
pub struct RedisIndex {
    cfg: RedisConfig,
    client: conn::Client,
    conns: Mutex<Vec<conn::Conn>>,
    pods: Arc<Pods>,
    speculative: InMemoryIndex,
    /// This replica's view of each pod's epoch (refreshed by lookups).
    epochs: Mutex<HashMap<String, u64>>,
    /// Redis failed: skip it until then.
    down_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
    up: AtomicBool,
    errors: AtomicU64,
    /// Block key → (read at, value) of recent reads.
    cache: Mutex<CacheMap>,
    cache_hits: AtomicU64,
    /// Bumped after every write of this replica: a read that raced one is not cached.
    writes: AtomicU64,
    /// Pod name → (last checked, held) of the writer leases.
    leases: Mutex<HashMap<String, (Instant, bool)>>,
    /// Called when this replica takes over a pod's lease (to replay what it skipped).
    on_acquire: Mutex<Option<OnAcquire>>,
    /// Pod name → last batch applied (`P:seq`), as this replica last read or wrote it;
    /// dropped when Redis fails or a lease changes hands.
    seqs: Mutex<HashMap<String, Option<u64>>>,
}

impl RedisIndex {
    /// A backend on `cfg.url`; pod ids are this process's (`pods`), names go to Redis.
    pub fn new(cfg: RedisConfig, pods: Arc<Pods>) -> Result<Self, RedisIndexError> {
        let client = conn::Client::open(&cfg.url, cfg.cluster, cfg.timeout)?;
        let speculative =
            InMemoryIndex::new(IndexConfig { speculative_ttl: cfg.speculative_ttl, ..Default::default() });
        Ok(Self {
            cfg,
            client,
            conns: Mutex::new(Vec::new()),
            pods,
            speculative,
            epochs: Mutex::new(HashMap::new()),
            down_until: Mutex::new(None),
            last_warning: Mutex::new(None),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            cache: Mutex::new(CacheMap::default()),
            cache_hits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            on_acquire: Mutex::new(None),
            seqs: Mutex::new(HashMap::new()),
        })
    }

    /// Pings the server (`None` when unreachable).
    pub fn ping(&self) -> Option<()> {
        self.with_conn(|c| redis::cmd("PING").query::<String>(c)).map(|_| ())
    }

    /// Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Runs `f(pod name)` whenever this replica takes over a pod's writer lease.
    pub fn on_lease_acquired(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self.on_acquire.lock() = Some(Box::new(f));
    }

    /// Takes or renews the writer lease of every known pod (call more often than a third
    /// of the lease, e.g. from a timer: leases also move when a pod sends no events).
    pub fn maintain_leases(&self) {
        for id in 0..self.pods.len() {
            if let Some(name) = self.pods.name(id as PodId) {
                self.writes_for(&name);
            }
        }
    }

    /// Whether this replica writes `name`'s events (always, without writer leases).
    fn writes_for(&self, name: &str) -> bool {
        let lease = self.cfg.writer_lease;
        let now = Instant::now();
        if let Some(&(at, held)) = self.leases.lock().get(name) {
            if now.duration_since(at) < lease / 3 {
                return held;
            }
        }
        let key = format!("{}:owner:{name}", self.cfg.prefix);
        let held = self
            .with_conn(|c| LEASE.key(&key).arg(&self.cfg.replica_id).arg(lease.as_millis() as u64).invoke::<i64>(c))
            .is_some_and(|r| r == 1);
        let before = self.leases.lock().insert(name.to_string(), (now, held));
        if held && !before.is_some_and(|b| b.1) {
            tracing::info!(pod = name, replica = %self.cfg.replica_id, "writer lease acquired");
            self.seqs.lock().remove(name); // the previous writer moved it on
            if let Some(f) = self.on_acquire.lock().as_ref() {
                f(name);
            }
        }
        held
    }

    /// Block values served from the local cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Relaxed)
    }

    fn invalidate(&self, keys: &[u64]) {
        if self.cfg.cache_ttl.is_zero() {
            return;
        }
        self.writes.fetch_add(1, Relaxed);
        let mut c = self.cache.lock();
        for k in keys {
            c.remove(k);
        }
    }

    /// Failed Redis calls so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }

    fn block_key(&self, k: u64) -> String {
        format!("{}:b:{k:016x}", self.cfg.prefix)
    }

    fn epochs_key(&self) -> String {
        format!("{}:epochs", self.cfg.prefix)
    }

    fn counts_key(&self) -> String {
        format!("{}:counts", self.cfg.prefix)
    }

    fn seq_key(&self) -> String {
        format!("{}:seq", self.cfg.prefix)
    }

    /// Runs `f` on a pooled connection; on failure marks Redis down for 500 ms.
    fn with_conn<T>(&self, f: impl FnOnce(&mut conn::Conn) -> redis::RedisResult<T>) -> Option<T> {
        if self.down_until.lock().is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let conn = self.conns.lock().pop();
        let mut conn = match conn {
            Some(c) => c,
            None => match self.client.connect(self.cfg.timeout) {
                Ok(c) => c,
                Err(e) => return self.failed(e),
            },
        };
        match f(&mut conn) {
            Ok(v) => {
                self.conns.lock().push(conn);
                if !self.up.swap(true, Relaxed) {
                    tracing::info!("redis index reachable again");
                }
                Some(v)
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed<T>(&self, e: redis::RedisError) -> Option<T> {
        self.errors.fetch_add(1, Relaxed);
        self.seqs.lock().clear(); // Redis may come back with less (or nothing)
        self.up.store(false, Relaxed);
        *self.down_until.lock() = Some(Instant::now() + Duration::from_millis(500));
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            tracing::warn!("redis index unreachable, routing on the local view: {e}");
            *last = Some(Instant::now());
        }
        None
    }

    fn epoch_of(&self, name: &str) -> u64 {
        if let Some(&e) = self.epochs.lock().get(name) {
            return e;
        }
        let key = self.epochs_key();
        let e =
            self.with_conn(|c| redis::cmd("HGET").arg(&key).arg(name).query::<Option<u64>>(c)).flatten().unwrap_or(0);
        self.epochs.lock().insert(name.to_string(), e);
        e
    }

    /// The epochs and the value of every key: fresh cached values, the rest in one round
    /// trip (`HGETALL` of the epochs + `MGET`).
    #[allow(clippy::type_complexity)]
    fn fetch(&self, keys: &[u64]) -> Option<(HashMap<String, u64>, Vec<Option<Arc<str>>>)> {
        let ttl = self.cfg.cache_ttl;
        let now = Instant::now();
        let mut values: Vec<Option<Option<Arc<str>>>> = vec![None; keys.len()];
        if !ttl.is_zero() {
            let c = self.cache.lock();
            for (i, k) in keys.iter().enumerate() {
                if let Some((at, v)) = c.get(k) {
                    if now.duration_since(*at) < ttl {
                        values[i] = Some(v.clone());
                    }
                }
            }
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        self.cache_hits.fetch_add((keys.len() - missing.len()) as u64, Relaxed);
        let generation = self.writes.load(Relaxed);
        let block_keys: Vec<String> = missing.iter().map(|&i| self.block_key(keys[i])).collect();
        let epochs_key = self.epochs_key();
        let (epochs, fetched) = self.with_conn(|c| c.fetch(&epochs_key, &block_keys))?;
        if fetched.len() != missing.len() {
            return None;
        }
        let mut c = (!ttl.is_zero()).then(|| self.cache.lock()).filter(|_| self.writes.load(Relaxed) == generation);
        if let Some(c) = c.as_mut() {
            if c.len() + missing.len() > self.cfg.cache_capacity {
                c.clear();
            }
        }
        for (&i, v) in missing.iter().zip(fetched) {
            let v: Option<Arc<str>> = v.map(Arc::from);
            if let Some(c) = c.as_mut().filter(|_| i < self.cfg.cache_prefix_blocks) {
                c.insert(keys[i], (now, v.clone()));
            }
            values[i] = Some(v);
        }
        Some((epochs, values.into_iter().map(|v| v.flatten()).collect()))
    }

    /// One batched write of `pod`'s blocks (a block script given the pod's name and epoch,
    /// returning its further arguments), if this replica writes that pod; cached values of
    /// the blocks are dropped before and after it (a read that ran during the write must
    /// not stay cached).
    fn write_blocks(
        &self,
        pod: PodId,
        keys: &[u64],
        (script, code): (&redis::Script, &str),
        args: impl FnOnce(&str, u64) -> Vec<String>,
    ) {
        self.invalidate(keys);
        let Some(name) = self.pods.name(pod) else { return };
        if keys.is_empty() || !self.writes_for(&name) {
            return;
        }
        let args = args(&name, self.epoch_of(&name));
        let block_keys: Vec<String> = keys.iter().map(|&k| self.block_key(k)).collect();
        let counts = self.counts_key();
        self.with_conn(|c| c.write(script, code, &counts, &name, &block_keys, &args));
        self.invalidate(keys);
    }

    fn field(name: &str, tier: TierId) -> String {
        format!("{name}|{tier}")
    }
}

impl BlockIndex for RedisIndex {
    fn store(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        self.speculative.remove(pod, Some(tier), keys);
        let ttl = self.cfg.ttl.as_secs().max(1);
        self.write_blocks(pod, keys, (&STORE, STORE_LUA), |name, epoch| {
            vec![Self::field(name, tier), epoch.to_string(), ttl.to_string()]
        });
    }

    fn store_speculative(&self, pod: PodId, tier: TierId, keys: &[u64]) {
        self.speculative.store_speculative(pod, tier, keys);
    }

    fn remove(&self, pod: PodId, tier: Option<TierId>, keys: &[u64]) {
        self.speculative.remove(pod, tier, keys);
        self.write_blocks(pod, keys, (&REMOVE, REMOVE_LUA), |name, epoch| {
            let mut args = vec![epoch.to_string()];
            match tier {
                Some(t) => args.push(Self::field(name, t)),
                None => args.extend((0..MAX_TIERS as TierId).map(|t| Self::field(name, t))),
            }
            args
        });
    }

    fn clear_pod(&self, pod: PodId) {
        self.speculative.clear_pod(pod);
        self.cache.lock().clear();
        let Some(name) = self.pods.name(pod) else { return };
        if !self.writes_for(&name) {
            return;
        }
        let (epochs, counts, seqs) = (self.epochs_key(), self.counts_key(), self.seq_key());
        self.seqs.lock().remove(&name);
        if let Some(e) = self.with_conn(|c| {
            let e: u64 = redis::cmd("HINCRBY").arg(&epochs).arg(&name).arg(1).query(c)?;
            redis::cmd("HSET").arg(&counts).arg(&name).arg(0).query::<i64>(c)?;
            redis::cmd("HDEL").arg(&seqs).arg(&name).query::<i64>(c)?;
            Ok(e)
        }) {
            self.epochs.lock().insert(name.clone(), e);
            self.seqs.lock().insert(name, None);
        }
    }

    fn prefix_lookup(&self, keys: &[u64], f: &mut dyn FnMut(usize, &[PodEntry]) -> bool) {
        // Local speculative entries, per key.
        let mut spec: Vec<Vec<PodEntry>> = vec![Vec::new(); keys.len()];
        self.speculative.prefix_lookup(keys, &mut |i, e| {
            spec[i].extend_from_slice(e);
            true
        });
        let shared = if keys.is_empty() { None } else { self.fetch(keys) };
        let Some((epochs, values)) = shared.filter(|r| r.1.len() == keys.len()) else {
            // Redis down: the local view only.
            for (i, e) in spec.iter().enumerate() {
                if e.is_empty() || !f(i, e) {
                    return;
                }
            }
            return;
        };
        self.epochs.lock().extend(epochs.iter().map(|(k, v)| (k.clone(), *v)));
        let mut entries = Vec::new();
        for (i, value) in values.iter().enumerate() {
            entries.clear();
            for entry in value.as_deref().unwrap_or_default().split(';').filter(|e| !e.is_empty()) {
                let Some((field, value)) = entry.rsplit_once('=') else { continue };
                let Some((name, tier)) = field.rsplit_once('|') else { continue };
                let epoch = value.split_once(':').map_or(value, |(e, _copies)| e);
                let Ok(epoch) = epoch.parse::<u64>() else { continue };
                if epoch < epochs.get(name).copied().unwrap_or(0) {
                    continue; // stored before the pod was cleared
                }
                let (Ok(pod), Ok(tier)) = (self.pods.intern(name), tier.parse::<TierId>()) else { continue };
                entries.push(PodEntry::of(pod, tier, false));
            }
            for e in &spec[i] {
                if !entries.iter().any(|x| x.pod() == e.pod() && x.tier() == e.tier()) {
                    entries.push(*e);
                }
            }
            if entries.is_empty() || !f(i, &entries) {
                return;
            }
        }
    }

    fn pod_entries(&self, pod: PodId) -> u64 {
        let Some(name) = self.pods.name(pod) else { return 0 };
        let counts = self.counts_key();
        self.with_conn(|c| redis::cmd("HGET").arg(&counts).arg(&name).query::<Option<i64>>(c))
            .flatten()
            .unwrap_or(0)
            .max(0) as u64
    }

    fn blocks_on_network(&self) -> bool {
        true
    }

    fn tracks_applied_seq(&self) -> bool {
        true
    }

    fn applied_seq(&self, pod: PodId) -> Option<u64> {
        let name = self.pods.name(pod)?;
        // A replica that does not write the pod applies nothing to Redis anyway; checking
        // the lease first also drops a stale cached value when the lease just came here.
        if !self.writes_for(&name) {
            return None;
        }
        if let Some(&s) = self.seqs.lock().get(&name) {
            return s;
        }
        let key = self.seq_key();
        // Unreachable: nothing is written either, so nothing counts twice.
        let s = self.with_conn(|c| redis::cmd("HGET").arg(&key).arg(&name).query::<Option<u64>>(c))?;
        self.seqs.lock().insert(name, s);
        s
    }

    fn set_applied_seq(&self, pod: PodId, seq: u64) {
        let Some(name) = self.pods.name(pod) else { return };
        if !self.writes_for(&name) {
            return;
        }
        let key = self.seq_key();
        if self.with_conn(|c| redis::cmd("HSET").arg(&key).arg(&name).arg(seq).query::<i64>(c)).is_some() {
            self.seqs.lock().insert(name, Some(seq));
        }
    }

    fn stats(&self) -> IndexStats {
        let counts = self.counts_key();
        let total: i64 = self
            .with_conn(|c| redis::cmd("HVALS").arg(&counts).query::<Vec<i64>>(c))
            .map(|v| v.into_iter().map(|x| x.max(0)).sum())
            .unwrap_or(0);
        let s = self.speculative.stats();
        IndexStats { entries: total as u64, pending_speculative: s.pending_speculative, ..Default::default() }
    }
}
