//! The `remote` tier: KVC rows in Redis or Valkey, shared by every process
//! and host that points at the same server (docs/tiers.md, the remote
//! tier).
//!
//! A row is stored as its whole KVC file (the same bytes as a file tier)
//! under `{prefix}:row:<hex key>`; its size, last use and hit count live
//! next to it in `{prefix}:size` (hash), `{prefix}:lru` (sorted set, score
//! = the server's time of last use in ms), `{prefix}:hits` (hash) and the
//! total in `{prefix}:bytes`. Every key carries the hash tag `{prefix}`, so
//! on Redis Cluster one prefix lives in one hash slot and the Lua scripts
//! that keep the quota can touch all of them atomically.
//!
//! The store failing never fails a request: every operation has a timeout,
//! runs on a private tokio runtime (callers are plain threads; nothing
//! blocks a caller's runtime), and a circuit breaker skips the server for
//! a while after consecutive failures, after which the next operation
//! reconnects. Nothing read from the server is trusted: the cache
//! validates a fetched row like a file (framing, CRC32C, recomputed key)
//! before it is used.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Script};

use crate::counters::{Counter, Counters};
use crate::key::CacheKey;

/// Settings of the remote tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://…` (TLS).
    pub url: String,
    /// Key prefix (also the Redis Cluster hash tag): 1–64 characters, no
    /// braces or whitespace.
    pub prefix: String,
    /// Byte quota of the rows stored under the prefix, kept by the
    /// writers' eviction script (least recently used first).
    pub quota: u64,
    /// A row not used for this long expires (`None`: never). Every hit
    /// renews it.
    pub ttl: Option<Duration>,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one operation, the transfer of a row included.
    pub op_timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub failures_to_open: u32,
    /// How long the breaker stays open (the server is not asked) before
    /// the next operation tries it again.
    pub retry_after: Duration,
}

impl RemoteConfig {
    /// A remote tier at `url` with the default prefix (`erllama`), quota
    /// (4 GiB), no TTL and the default timeouts.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "erllama".into(),
            quota: 4 << 30,
            ttl: None,
            connect_timeout: Duration::from_millis(500),
            op_timeout: Duration::from_secs(2),
            failures_to_open: 3,
            retry_after: Duration::from_secs(2),
        }
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.prefix;
        if p.is_empty()
            || p.len() > 64
            || p.chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "remote prefix {p:?} must be 1-64 characters without braces or whitespace"
            ));
        }
        if self.quota == 0 {
            return Err("remote quota must be positive".into());
        }
        if self.ttl.is_some_and(|t| t.as_millis() == 0) {
            return Err("remote ttl must be at least 1 ms".into());
        }
        for (name, d) in [
            ("connect timeout", self.connect_timeout),
            ("operation timeout", self.op_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(600) {
                return Err(format!("remote {name} must be in (0, 600] s, got {d:?}"));
            }
        }
        if self.failures_to_open == 0 {
            return Err("remote failures_to_open must be positive".into());
        }
        if self.retry_after > Duration::from_secs(3600) {
            return Err("remote retry_after must be at most an hour".into());
        }
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())
            .map_err(|e| format!("remote url: {e}"))?;
        let _ = info;
        Ok(())
    }
}

/// Why a remote operation did not complete. Never reaches a request: the
/// cache counts it (`remote_errors`, `remote_skipped`) and goes on as on a
/// miss.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The circuit breaker is open: the server failed recently.
    #[error("the remote store is skipped for a while after failing")]
    Open,
    /// The operation or connection ran past its timeout.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The server or the connection reported an error.
    #[error("{op}: {source}")]
    Redis {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

/// A row as listed by [`Remote::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRow {
    /// The row's key.
    pub key: CacheKey,
    /// Bytes stored.
    pub size: u64,
    /// Hits counted by every process.
    pub hits: u64,
    /// Server time of the last use, in ms since the epoch.
    pub last_used_ms: u64,
}

/// What the remote tier holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RemoteStats {
    /// Rows accounted under the prefix.
    pub rows: u64,
    /// Bytes accounted under the prefix.
    pub bytes: u64,
}

/// What [`Remote::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored; this many rows were evicted to make room.
    Stored {
        /// Rows evicted.
        evicted: u64,
    },
    /// The key was already stored (marked used).
    Present,
    /// The row is larger than the quota.
    TooLarge,
}

/// Server time in ms, from inside a script.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Forgets `victim`: its row, size, hits and LRU entry, and its bytes in
/// the total. KEYS: lru, size, hits, bytes; `rp` is the row key prefix.
const DROP: &str = "local function drop(victim)
  local s = tonumber(redis.call('HGET', KEYS[2], victim) or '0')
  redis.call('ZREM', KEYS[1], victim)
  redis.call('HDEL', KEYS[2], victim)
  redis.call('HDEL', KEYS[3], victim)
  redis.call('DEL', rp .. victim)
  if s > 0 then redis.call('DECRBY', KEYS[4], s) end
end
";

/// Accounts a row before its bytes are written, evicting the least
/// recently used rows (and rows past their TTL) until it fits the quota.
/// ARGV: hex, size, quota, ttl ms (0: none), row prefix. Returns -1 (too
/// large), 0 (present) or 1 + rows evicted.
fn reserve_script() -> Lua {
    Lua::new(format!(
        "local hex, n, quota, ttl, rp = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
{NOW}{DROP}
if redis.call('EXISTS', rp .. hex) == 1 or redis.call('ZSCORE', KEYS[1], hex) then
  redis.call('ZADD', KEYS[1], 'XX', now, hex)
  return 0
end
if n > quota then return -1 end
if ttl > 0 then
  for _, victim in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'LIMIT', 0, 256)) do
    drop(victim)
  end
end
local evicted = 0
while tonumber(redis.call('GET', KEYS[4]) or '0') + n > quota do
  local v = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #v == 0 then
    redis.call('SET', KEYS[4], 0)
    break
  end
  drop(v[1])
  evicted = evicted + 1
end
redis.call('ZADD', KEYS[1], now, hex)
redis.call('HSET', KEYS[2], hex, n)
redis.call('INCRBY', KEYS[4], n)
return 1 + evicted"
    ))
}

/// Marks a row used by a hit: LRU time, hit count, TTL. ARGV: hex, ttl
/// ms, row prefix. KEYS: lru, hits.
fn touch_script() -> Lua {
    Lua::new(format!(
        "local hex, ttl, rp = ARGV[1], tonumber(ARGV[2]), ARGV[3]
{NOW}
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now, hex) == 1 or redis.call('ZSCORE', KEYS[1], hex) then
  redis.call('HINCRBY', KEYS[2], hex, 1)
end
if ttl > 0 then redis.call('PEXPIRE', rp .. hex, ttl) end
return 1"
    ))
}

/// Deletes a row and its accounting. ARGV: hex, row prefix.
fn delete_script() -> Lua {
    Lua::new(format!(
        "local hex, rp = ARGV[1], ARGV[2]
{DROP}
local had = redis.call('EXISTS', rp .. hex)
drop(hex)
return had"
    ))
}

/// A Lua script run by EVALSHA, loaded (EVAL) when the server does not
/// know it yet.
struct Lua {
    src: String,
    sha: String,
}

impl Lua {
    fn new(src: String) -> Self {
        let sha = Script::new(&src).get_hash().to_owned();
        Self { src, sha }
    }

    /// The invocation, owning what it sends.
    fn call<T: redis::FromRedisValue + Send + 'static>(
        &self,
        keys: &[&str],
        args: &[String],
    ) -> impl FnOnce(
        MultiplexedConnection,
    ) -> std::pin::Pin<Box<dyn Future<Output = redis::RedisResult<T>> + Send>> {
        let build = |name: &str, head: &str| {
            let mut c = redis::cmd(name);
            c.arg(head).arg(keys.len());
            for k in keys {
                c.arg(*k);
            }
            for a in args {
                c.arg(a);
            }
            c
        };
        let (evalsha, eval): (Cmd, Cmd) = (build("EVALSHA", &self.sha), build("EVAL", &self.src));
        move |mut c| {
            Box::pin(async move {
                match evalsha.query_async::<T>(&mut c).await {
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        eval.query_async(&mut c).await
                    }
                    other => other,
                }
            })
        }
    }
}

/// The circuit breaker: opens after `failures_to_open` consecutive
/// failures for `retry_after`, then lets operations try again (the first
/// success closes it).
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// Which connection an operation uses: lookups never queue behind a
/// row being written.
#[derive(Clone, Copy)]
enum Lane {
    Read = 0,
    Write = 1,
}

struct Keys {
    row_prefix: String,
    lru: String,
    size: String,
    hits: String,
    bytes: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}");
        Self {
            row_prefix: format!("{tag}:row:"),
            lru: format!("{tag}:lru"),
            size: format!("{tag}:size"),
            hits: format!("{tag}:hits"),
            bytes: format!("{tag}:bytes"),
        }
    }

    fn row(&self, key: &CacheKey) -> String {
        format!("{}{}", self.row_prefix, key.to_hex())
    }
}

/// A connection to the remote store (see the module docs).
pub struct Remote {
    config: RemoteConfig,
    client: Client,
    keys: Keys,
    runtime: Option<tokio::runtime::Runtime>,
    lanes: [Mutex<Option<MultiplexedConnection>>; 2],
    breaker: Mutex<Breaker>,
    counters: Arc<Counters>,
    reserve: Lua,
    touch: Lua,
    delete: Lua,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("prefix", &self.config.prefix)
            .field("quota", &self.config.quota)
            .finish_non_exhaustive()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Never blocks, even when the last handle is dropped inside an
        // async context.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Remote {
    /// A handle on the store (no connection is made yet: the first
    /// operation connects, so a server that is down does not stop the
    /// cache from opening).
    ///
    /// # Errors
    ///
    /// A message for invalid settings or an unusable URL.
    pub fn new(config: RemoteConfig, counters: Arc<Counters>) -> Result<Self, String> {
        config.validate()?;
        let client = Client::open(config.url.as_str()).map_err(|e| format!("remote url: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("erllama-remote")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the remote tier's runtime: {e}"))?;
        Ok(Self {
            keys: Keys::new(&config.prefix),
            config,
            client,
            runtime: Some(runtime),
            lanes: [Mutex::new(None), Mutex::new(None)],
            breaker: Mutex::new(Breaker::default()),
            counters,
            reserve: reserve_script(),
            touch: touch_script(),
            delete: delete_script(),
        })
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &RemoteConfig {
        &self.config
    }

    /// The Redis key a row is stored under.
    #[must_use]
    pub fn row_key(&self, key: &CacheKey) -> String {
        self.keys.row(key)
    }

    /// Runs `fut` on the private runtime and waits for it, at most
    /// `timeout` (callers are plain threads; this works from inside an
    /// async context too, blocking only the calling thread).
    fn block<T: Send + 'static>(
        &self,
        what: &'static str,
        timeout: Duration,
        fut: impl Future<Output = redis::RedisResult<T>> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let rt = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the handle");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let out = tokio::time::timeout(timeout, fut).await;
            let _ = tx.send(out);
        });
        match rx.recv() {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(source))) => Err(RemoteError::Redis { op: what, source }),
            Ok(Err(_)) | Err(_) => Err(RemoteError::Timeout(what)),
        }
    }

    fn connection(&self, lane: Lane) -> Result<MultiplexedConnection, RemoteError> {
        let slot = &self.lanes[lane as usize];
        if let Some(c) = slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Ok(c.clone());
        }
        let client = self.client.clone();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(self.config.op_timeout));
        let conn = self.block("connect", self.config.connect_timeout, async move {
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
        })?;
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// One operation through the breaker: skipped while it is open; a
    /// failure drops the lane's connection (the next operation reconnects)
    /// and is counted in `remote_errors`.
    fn op<T: Send + 'static, F>(
        &self,
        lane: Lane,
        what: &'static str,
        f: impl FnOnce(MultiplexedConnection) -> F,
    ) -> Result<T, RemoteError>
    where
        F: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        {
            let b = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
            if b.open_until.is_some_and(|t| Instant::now() < t) {
                self.counters.incr(Counter::RemoteSkipped);
                return Err(RemoteError::Open);
            }
        }
        let result = self
            .connection(lane)
            .and_then(|conn| self.block(what, self.config.op_timeout, f(conn)));
        let mut b = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) => *b = Breaker::default(),
            Err(e) => {
                self.counters.incr(Counter::RemoteErrors);
                *self.lanes[lane as usize]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                b.failures = b.failures.saturating_add(1);
                if b.failures >= self.config.failures_to_open {
                    if b.open_until.is_none() {
                        tracing::warn!(error = %e, retry_after = ?self.config.retry_after,
                            "the remote cache store is failing; skipping it for a while");
                    }
                    b.open_until = Some(Instant::now() + self.config.retry_after);
                } else {
                    tracing::debug!(error = %e, "a remote cache operation failed");
                }
            }
        }
        result
    }

    /// Which of `keys` (in order) is the first the store holds, and its
    /// size in bytes, in one round trip (`STRLEN` of each).
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn first_present(&self, keys: &[CacheKey]) -> Result<Option<(usize, u64)>, RemoteError> {
        if keys.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("STRLEN").arg(self.keys.row(k));
        }
        let sizes: Vec<u64> = self.op(Lane::Read, "probe", move |mut c| async move {
            pipe.query_async(&mut c).await
        })?;
        Ok(sizes.iter().position(|&n| n > 0).map(|i| (i, sizes[i])))
    }

    /// The bytes stored under `key` (`size` of them, as the probe found),
    /// if they are still there; a hit is marked used (LRU, hits, TTL)
    /// without waiting for the server's answer. A large row comes in
    /// 4 MiB ranges inside one `MULTI` (a consistent snapshot), copied
    /// into a recycled, already faulted-in buffer: no reallocation chain
    /// and no page fault per 4 KiB of a fresh one.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn get(&self, key: &CacheKey, size: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        const CHUNK: u64 = 4 << 20;
        let row = self.keys.row(key);
        let Ok(len) = usize::try_from(size) else {
            return Ok(None);
        };
        let bytes = if size <= CHUNK {
            self.op(Lane::Read, "get", move |mut c| async move {
                redis::cmd("GET")
                    .arg(row)
                    .query_async::<Option<Vec<u8>>>(&mut c)
                    .await
            })?
        } else {
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("STRLEN").arg(&row);
            let mut at = 0;
            while at < size {
                pipe.cmd("GETRANGE")
                    .arg(&row)
                    .arg(at)
                    .arg((at + CHUNK).min(size) - 1);
                at += CHUNK;
            }
            let (stored, parts): (u64, Vec<Vec<u8>>) =
                self.op(Lane::Read, "get", move |mut c| async move {
                    let mut all: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                    let stored = redis::from_redis_value(all.remove(0))?;
                    let parts = all
                        .into_iter()
                        .map(redis::from_redis_value)
                        .collect::<Result<Vec<Vec<u8>>, _>>()?;
                    Ok((stored, parts))
                })?;
            // Replaced by a row of another size, or gone, since the probe.
            if stored != size {
                return Ok(None);
            }
            let mut buf = crate::tier::pool::take(len);
            for p in &parts {
                buf.extend_from_slice(p);
            }
            Some(buf)
        };
        let Some(bytes) = bytes.filter(|b| b.len() == len) else {
            return Ok(None);
        };
        self.counters
            .add(Counter::RemoteBytesRead, bytes.len() as u64);
        self.touch_later(key);
        Ok(Some(bytes))
    }

    /// Marks a hit used (LRU time, hit count, TTL) on the runtime, without
    /// waiting for the answer; a failure is counted.
    fn touch_later(&self, key: &CacheKey) {
        let Ok(conn) = self.connection(Lane::Read) else {
            return;
        };
        let ttl = self.config.ttl.map_or(0, ms);
        let fut = self.touch.call::<i64>(
            &[&self.keys.lru, &self.keys.hits],
            &[key.to_hex(), ttl.to_string(), self.keys.row_prefix.clone()],
        )(conn);
        let counters = Arc::clone(&self.counters);
        let timeout = self.config.op_timeout;
        let rt = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the handle");
        rt.spawn(async move {
            if !matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(_))) {
                counters.incr(Counter::RemoteErrors);
            }
        });
    }

    /// Whether the store holds a row under `key` (one `EXISTS`): a writer
    /// asks before reading its row back to send it.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn contains(&self, key: &CacheKey) -> Result<bool, RemoteError> {
        let row = self.keys.row(key);
        self.op(Lane::Write, "exists", move |mut c| async move {
            redis::cmd("EXISTS").arg(row).query_async(&mut c).await
        })
    }

    /// Stores a whole KVC row under `key` within the quota (least
    /// recently used rows go first). The accounting comes first, so
    /// concurrent writers never hold more than the quota together; a key
    /// already stored (or being stored) is [`PutOutcome::Present`] and no
    /// bytes are sent.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted); the row's accounting is undone.
    pub fn put(&self, key: &CacheKey, kvc: &[u8]) -> Result<PutOutcome, RemoteError> {
        let hex = key.to_hex();
        let row = self.keys.row(key);
        let call = self.reserve.call::<i64>(
            &self.accounting(),
            &[
                hex,
                kvc.len().to_string(),
                self.config.quota.to_string(),
                self.config.ttl.map_or(0, ms).to_string(),
                self.keys.row_prefix.clone(),
            ],
        );
        let reserved = self.op(Lane::Write, "reserve", call)?;
        match reserved {
            -1 => return Ok(PutOutcome::TooLarge),
            0 => return Ok(PutOutcome::Present),
            _ => {}
        }
        let mut set = redis::cmd("SET");
        set.arg(&row).arg(kvc);
        if let Some(ttl) = self.config.ttl {
            set.arg("PX").arg(ms(ttl));
        }
        let stored = self.op(Lane::Write, "set", move |mut c| async move {
            set.query_async::<()>(&mut c).await
        });
        if let Err(e) = stored {
            let _ = self.delete(key);
            return Err(e);
        }
        self.counters.incr(Counter::RemoteWrites);
        self.counters
            .add(Counter::RemoteBytesWritten, kvc.len() as u64);
        Ok(PutOutcome::Stored {
            evicted: u64::try_from(reserved - 1).unwrap_or(0),
        })
    }

    fn accounting(&self) -> [&str; 4] {
        [
            &self.keys.lru,
            &self.keys.size,
            &self.keys.hits,
            &self.keys.bytes,
        ]
    }

    /// Deletes the row under `key` and its accounting; whether it was
    /// there.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn delete(&self, key: &CacheKey) -> Result<bool, RemoteError> {
        let call = self.delete.call::<i64>(
            &self.accounting(),
            &[key.to_hex(), self.keys.row_prefix.clone()],
        );
        let had = self.op(Lane::Write, "delete", call)?;
        Ok(had == 1)
    }

    /// Rows and bytes accounted under the prefix.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn stats(&self) -> Result<RemoteStats, RemoteError> {
        let (lru, bytes) = (self.keys.lru.clone(), self.keys.bytes.clone());
        let (rows, bytes): (u64, Option<u64>) =
            self.op(Lane::Read, "stats", move |mut c| async move {
                redis::pipe()
                    .cmd("ZCARD")
                    .arg(lru)
                    .cmd("GET")
                    .arg(bytes)
                    .query_async(&mut c)
                    .await
            })?;
        Ok(RemoteStats {
            rows,
            bytes: bytes.unwrap_or(0),
        })
    }

    /// Up to `limit` rows, least recently used first.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] (counted).
    pub fn list(&self, limit: usize) -> Result<Vec<RemoteRow>, RemoteError> {
        let (lru, size, hits) = (
            self.keys.lru.clone(),
            self.keys.size.clone(),
            self.keys.hits.clone(),
        );
        let stop = i64::try_from(limit).unwrap_or(i64::MAX).saturating_sub(1);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let entries: Vec<(String, f64)> = {
            let lru = lru.clone();
            self.op(Lane::Read, "list", move |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(lru)
                    .arg(0)
                    .arg(stop)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })?
        };
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = entries.iter().map(|(h, _)| h.clone()).collect();
        let (sizes, counts): (Vec<Option<u64>>, Vec<Option<u64>>) =
            self.op(Lane::Read, "list", move |mut c| async move {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(size)
                    .arg(&names)
                    .cmd("HMGET")
                    .arg(hits)
                    .arg(&names)
                    .query_async(&mut c)
                    .await
            })?;
        Ok(entries
            .into_iter()
            .zip(sizes.into_iter().zip(counts))
            .filter_map(|((hex, score), (size, hits))| {
                Some(RemoteRow {
                    key: CacheKey::from_hex(&hex).ok()?,
                    size: size.unwrap_or(0),
                    hits: hits.unwrap_or(0),
                    // Scores are whole ms, far below 2^53.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    last_used_ms: score.max(0.0) as u64,
                })
            })
            .collect())
    }
}
