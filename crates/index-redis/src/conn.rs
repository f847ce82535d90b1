//! Connections to one Redis/Valkey server or to a Redis Cluster, and the two calls whose
//! shape differs between them: reading a prompt's blocks and writing a batch of blocks.
//!
//! On one server a lookup is one pipeline (`HGETALL` + `MGET`) and a write is one Lua
//! call that also updates the entry counts. In a cluster the block keys spread over all
//! slots (that is the point: the index shards with the cluster), a multi-key command may
//! only touch one slot, so a lookup is one pipeline of `GET`s that the client splits per
//! node and sends to all nodes at once, and a write is one Lua call per slot (again
//! pipelined per node), followed by one `HINCRBY` of the counts with the summed change.
//! The counts stay exact (each script returns what it changed); they are just not
//! updated in the same atomic step as the blocks.

use std::collections::HashMap;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::Slot;
use redis::{ConnectionLike, ErrorKind, RedisResult, Script, ServerErrorKind};

/// Where the index lives.
pub(crate) enum Client {
    Node(redis::Client),
    Cluster(ClusterClient),
}

pub(crate) enum Conn {
    Node(redis::Connection),
    Cluster(Box<ClusterConnection>),
}

impl Client {
    /// `url`: one server, or (cluster) one or more seed nodes separated by commas.
    pub fn open(url: &str, cluster: bool, timeout: Duration) -> RedisResult<Self> {
        if !cluster {
            return Ok(Self::Node(redis::Client::open(url)?));
        }
        let seeds: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        // One retry: the index falls back to the local view rather than wait on a node.
        let client = ClusterClientBuilder::new(seeds)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()?;
        Ok(Self::Cluster(client))
    }

    pub fn connect(&self, timeout: Duration) -> RedisResult<Conn> {
        match self {
            Self::Node(c) => {
                let c = c.get_connection_with_timeout(timeout)?;
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))?;
                Ok(Conn::Node(c))
            }
            Self::Cluster(c) => Ok(Conn::Cluster(Box::new(c.get_connection()?))),
        }
    }
}

impl Conn {
    fn inner(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Self::Node(c) => c,
            Self::Cluster(c) => c,
        }
    }
}

/// Single-key commands and scripts run on either kind (the cluster client routes them).
impl ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<redis::Value> {
        self.inner().req_packed_command(cmd)
    }
    fn req_packed_commands(&mut self, cmd: &[u8], offset: usize, count: usize) -> RedisResult<Vec<redis::Value>> {
        self.inner().req_packed_commands(cmd, offset, count)
    }
    fn req_command(&mut self, cmd: &redis::Cmd) -> RedisResult<redis::Value> {
        self.inner().req_command(cmd)
    }
    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
    fn supports_pipelining(&self) -> bool {
        matches!(self, Self::Node(_))
    }
    fn check_connection(&mut self) -> bool {
        self.inner().check_connection()
    }
    fn is_open(&self) -> bool {
        match self {
            Self::Node(c) => c.is_open(),
            Self::Cluster(c) => c.is_open(),
        }
    }
}

/// The pods' epochs and one value per block key.
pub(crate) type Fetched = (HashMap<String, u64>, Vec<Option<String>>);

impl Conn {
    /// `HGETALL epochs` and the value of every key, in one round trip (per node).
    pub fn fetch(&mut self, epochs: &str, keys: &[String]) -> RedisResult<Fetched> {
        match self {
            Self::Node(c) => {
                let mut p = redis::pipe();
                p.cmd("HGETALL").arg(epochs);
                if keys.is_empty() {
                    let (e,): (HashMap<String, u64>,) = p.query(c)?;
                    return Ok((e, vec![]));
                }
                p.cmd("MGET").arg(keys);
                p.query(c)
            }
            Self::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                p.cmd("HGETALL").arg(epochs);
                for k in keys {
                    p.cmd("GET").arg(k);
                }
                let mut values: Vec<redis::Value> = p.query(c)?;
                let rest = values.split_off(1);
                let e: HashMap<String, u64> = redis::from_redis_value(values.remove(0))?;
                let v = rest
                    .into_iter()
                    .map(|v| redis::from_redis_value::<Option<String>>(v).map_err(redis::RedisError::from))
                    .collect::<RedisResult<Vec<_>>>()?;
                Ok((e, v))
            }
        }
    }

    /// Runs a block script (see `scripts`) over `blocks` with `args`, updating `counts`'
    /// field `name` by the change it reports; returns that change.
    pub fn write(
        &mut self,
        script: &Script,
        code: &str,
        counts: &str,
        name: &str,
        blocks: &[String],
        args: &[String],
    ) -> RedisResult<i64> {
        match self {
            Self::Node(c) => script.key(counts).key(blocks).arg(1).arg(name).arg(args).invoke(c),
            Self::Cluster(c) => {
                let mut by_slot: HashMap<Slot, Vec<&String>> = HashMap::new();
                for b in blocks {
                    by_slot.entry(Slot::for_key(b.as_bytes())).or_default().push(b);
                }
                let mut p = redis::cluster::cluster_pipe();
                for group in by_slot.values() {
                    p.cmd("EVALSHA").arg(script.get_hash()).arg(group.len()).arg(group).arg(0).arg(name).arg(args);
                }
                let changes: Vec<i64> = match p.query(c) {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        // A node without the script (new, restarted): load it everywhere.
                        redis::cmd("SCRIPT").arg("LOAD").arg(code).query::<String>(c)?;
                        p.query(c)?
                    }
                    r => r?,
                };
                let change: i64 = changes.iter().sum();
                if change != 0 {
                    redis::cmd("HINCRBY").arg(counts).arg(name).arg(change).query::<i64>(c)?;
                }
                Ok(change)
            }
        }
    }
}
