//! The remote tier against a real `redis-server` (Debian's package; `./dev`
//! installs it), started on a free loopback port in a temp directory and
//! stopped by each test: two caches sharing one server, validation of
//! what comes back, the quota and LRU kept in Redis, TTL, a server killed
//! and restarted, and a server that never answers.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{identity, request, toks};
use erllama_cache::{Cache, CacheConfig, CacheKey, Counter, RemoteConfig, TierKind};

/// A redis-server child on 127.0.0.1:`port`, killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn redis_server_binary() -> String {
    std::env::var("ERLLAMA_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Server {
    fn start(dir: &Path) -> Self {
        let mut s = Server {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (./dev installs redis-server): {e}",
                    redis_server_binary()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.client().get_connection() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("client")
    }

    fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect")
    }

    /// Whether the server holds a row under `key` (prefix `t`).
    fn holds(&self, key: &CacheKey) -> bool {
        redis::cmd("EXISTS")
            .arg(format!("{{t}}:row:{}", key.to_hex()))
            .query(&mut self.conn())
            .expect("exists")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn remote(url: &str) -> RemoteConfig {
    let mut r = RemoteConfig::new(url);
    r.prefix = "t".into();
    r.op_timeout = Duration::from_secs(2);
    r.connect_timeout = Duration::from_millis(500);
    r.retry_after = Duration::from_millis(200);
    r
}

fn cache_with(r: RemoteConfig) -> Cache {
    Cache::open(CacheConfig {
        ram_quota: 1 << 30,
        remote: Some(r),
        ..CacheConfig::default()
    })
    .expect("open")
}

/// A cache with a `disk` tier (and a `ram_file` one) under `root`.
fn with_file_tiers(root: &Path, ram_file: bool, r: RemoteConfig) -> Cache {
    let tier = |name: &str| Some(erllama_cache::FileTierConfig::new(root.join(name), 1 << 30));
    Cache::open(CacheConfig {
        ram_file: if ram_file { tier("shm") } else { None },
        disk: tier("disk"),
        remote: Some(r),
        ..CacheConfig::default()
    })
    .expect("open")
}

fn get(c: &Cache, n: Counter) -> u64 {
    c.counters().get(n)
}

/// Saves a row of `tokens` into `cache`'s RAM tier; returns its key.
fn save(cache: &Cache, tokens: &[u32], len: usize) -> CacheKey {
    cache
        .save(request(TierKind::Ram, tokens, len))
        .expect("save")
        .key
}

#[test]
fn a_row_saved_by_one_cache_is_a_hit_in_another_with_the_same_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let a = cache_with(remote(&server.url()));
    let b = cache_with(remote(&server.url()));
    let tokens = toks(7, 300);
    // Over 4 MiB: fetched in ranges inside one MULTI.
    let req = request(TierKind::Ram, &tokens, 9_000_000);
    let want = req.payload.clone();
    let key = a.save(req).expect("save").key;
    assert_eq!(get(&a, Counter::RemoteWrites), 1);
    assert!(get(&a, Counter::RemoteBytesWritten) > 9_000_000);
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(format!("{{t}}:row:{}", key.to_hex()))
        .query(&mut server.conn())
        .expect("get");
    assert_eq!(
        stored.len() as u64,
        a.bytes(TierKind::Ram),
        "the whole KVC row"
    );

    // B has nothing locally: the lookup order ends at the remote tier.
    assert!(b.peek(&key).is_none());
    let other = identity().key(&toks(9, 300));
    let claim = b
        .fetch_remote(&[other, key], TierKind::Ram)
        .expect("remote hit");
    assert_eq!(claim.key(), &key);
    assert_eq!(claim.tier(), TierKind::Ram);
    assert_eq!(claim.tokens(), &tokens[..]);
    assert_eq!(&claim.load().expect("load")[..], &want[..]);
    drop(claim);
    assert_eq!(get(&b, Counter::RemoteHits), 1);
    assert!(get(&b, Counter::RemoteBytesRead) >= stored.len() as u64);
    // Stored locally: the next lookup is a local hit, and B's import is
    // not written back.
    assert!(b.contains(&key));
    assert_eq!(get(&b, Counter::RemoteWrites), 0);
    // A miss is counted as one.
    assert!(b.fetch_remote(&[other], TierKind::Ram).is_none());
    assert_eq!(get(&b, Counter::RemoteMisses), 1);
    // Hits are counted in Redis.
    std::thread::sleep(Duration::from_millis(100));
    let rows = b.remote().expect("remote").list(10).expect("list");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].key, key);
    assert_eq!(rows[0].hits, 1);
    assert_eq!(rows[0].size, stored.len() as u64);
}

#[test]
fn a_remote_hit_is_stored_in_the_callers_file_tier() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let a = cache_with(remote(&server.url()));
    let key = save(&a, &toks(1, 200), 50_000);
    let b = with_file_tiers(tmp.path(), false, remote(&server.url()));
    let claim = b.fetch_remote(&[key], TierKind::Disk).expect("hit");
    assert_eq!(claim.tier(), TierKind::Disk);
    assert!(tmp
        .path()
        .join("disk")
        .join(format!("{}.kvc", key.to_hex()))
        .is_file());
}

#[test]
fn corrupt_and_foreign_values_are_deleted_counted_and_missed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let a = cache_with(remote(&server.url()));
    let b = cache_with(remote(&server.url()));
    let k1 = save(&a, &toks(1, 200), 9_000_000); // fetched in ranges
    let k2 = save(&a, &toks(2, 200), 40_000);
    let mut conn = server.conn();
    let row = |k: &CacheKey| format!("{{t}}:row:{}", k.to_hex());
    // One flipped payload byte: the CRC fails.
    let mut bytes: Vec<u8> = redis::cmd("GET")
        .arg(row(&k1))
        .query(&mut conn)
        .expect("get");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let () = redis::cmd("SET")
        .arg(row(&k1))
        .arg(&bytes)
        .query(&mut conn)
        .expect("set");
    assert!(b.fetch_remote(&[k1], TierKind::Ram).is_none());
    assert_eq!(get(&b, Counter::RemoteCorrupt), 1);
    assert_eq!(get(&b, Counter::RemoteHits), 0);
    assert!(!b.contains(&k1));
    assert!(!server.holds(&k1), "the corrupt value is deleted");
    // A valid row under another key (foreign): the recomputed key differs.
    let good: Vec<u8> = redis::cmd("GET")
        .arg(row(&k2))
        .query(&mut conn)
        .expect("get");
    let k3 = identity().key(&toks(3, 200));
    let () = redis::cmd("SET")
        .arg(row(&k3))
        .arg(&good)
        .query(&mut conn)
        .expect("set");
    assert!(b.fetch_remote(&[k3], TierKind::Ram).is_none());
    assert_eq!(get(&b, Counter::RemoteCorrupt), 2);
    assert!(!server.holds(&k3));
    // Garbage.
    let () = redis::cmd("SET")
        .arg(row(&k3))
        .arg("not a kvc row")
        .query(&mut conn)
        .expect("set");
    assert!(b.fetch_remote(&[k3], TierKind::Ram).is_none());
    assert_eq!(get(&b, Counter::RemoteCorrupt), 3);
    // The untouched row is still a hit.
    assert!(b.fetch_remote(&[k2], TierKind::Ram).is_some());
}

#[test]
fn the_quota_holds_in_redis_and_evicts_the_least_recently_used() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let mut r = remote(&server.url());
    let a = cache_with(remote(&server.url()));
    let row_size = {
        let k = save(&a, &toks(100, 100), 100_000);
        a.peek(&k).expect("row").size
    };
    r.quota = row_size * 5 / 2; // two rows fit, not three
    let (w1, w2) = (cache_with(r.clone()), cache_with(r.clone()));
    let reader = cache_with(r);
    let mut conn = server.conn();
    let _ = redis::cmd("FLUSHALL").query::<()>(&mut conn);
    let k1 = save(&w1, &toks(1, 100), 100_000);
    let k2 = save(&w2, &toks(2, 100), 100_000);
    // k1 is used: k2 becomes the least recently used.
    std::thread::sleep(Duration::from_millis(5));
    assert!(reader.fetch_remote(&[k1], TierKind::Ram).is_some());
    std::thread::sleep(Duration::from_millis(50));
    let k3 = save(&w1, &toks(3, 100), 100_000);
    let stats = reader.remote().expect("remote").stats().expect("stats");
    assert_eq!(stats.rows, 2);
    assert!(stats.bytes <= row_size * 5 / 2, "{stats:?}");
    let present = |k: &CacheKey| server.holds(k);
    assert!(present(&k1) && present(&k3) && !present(&k2));
    let used: u64 = redis::cmd("GET")
        .arg("{t}:bytes")
        .query(&mut conn)
        .expect("bytes");
    let sum: u64 = [k1, k3]
        .iter()
        .map(|k| {
            redis::cmd("STRLEN")
                .arg(format!("{{t}}:row:{}", k.to_hex()))
                .query::<u64>(&mut conn)
                .expect("strlen")
        })
        .sum();
    assert_eq!(used, sum, "the accounted bytes are the stored bytes");
    // A row larger than the whole quota is not stored.
    let big = save(&w2, &toks(4, 100), 400_000);
    assert!(!present(&big));
}

#[test]
fn rows_expire_after_their_ttl_and_each_hit_renews_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let mut r = remote(&server.url());
    r.ttl = Some(Duration::from_millis(1500));
    let a = cache_with(r.clone());
    let key = save(&a, &toks(1, 100), 10_000);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{{t}}:row:{}", key.to_hex()))
        .query(&mut server.conn())
        .expect("pttl");
    assert!(pttl > 0 && pttl <= 1500, "{pttl}");
    std::thread::sleep(Duration::from_millis(1700));
    let b = cache_with(r);
    assert!(b.fetch_remote(&[key], TierKind::Ram).is_none());
    assert_eq!(get(&b, Counter::RemoteMisses), 1);
}

#[test]
fn a_server_killed_mid_run_costs_misses_not_failures_and_hits_resume_after_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = Server::start(tmp.path());
    let a = cache_with(remote(&server.url()));
    let b = cache_with(remote(&server.url()));
    let k1 = save(&a, &toks(1, 100), 10_000);
    assert!(b.fetch_remote(&[k1], TierKind::Ram).is_some());
    server.kill();
    // Saves still publish locally; lookups are misses; errors are counted.
    let k2 = save(&a, &toks(2, 100), 10_000);
    assert!(a.contains(&k2));
    assert!(b.fetch_remote(&[k2], TierKind::Ram).is_none());
    assert!(get(&a, Counter::RemoteErrors) >= 1);
    assert!(get(&b, Counter::RemoteErrors) >= 1);
    // Consecutive failures open the breaker: the server is not asked.
    for _ in 0..4 {
        assert!(b.fetch_remote(&[k2], TierKind::Ram).is_none());
    }
    assert!(get(&b, Counter::RemoteSkipped) >= 1);
    // Restarted (empty: no persistence): after retry_after the next
    // operations reconnect, and new rows are shared again.
    server.spawn();
    std::thread::sleep(Duration::from_millis(300));
    let k3 = save(&a, &toks(3, 100), 10_000);
    let claim = b
        .fetch_remote(&[k3], TierKind::Ram)
        .expect("hit after restart");
    assert_eq!(claim.key(), &k3);
}

#[test]
fn a_server_that_never_answers_bounds_the_delay() {
    // Accepts connections and never replies.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let mut r = remote(&format!("redis://127.0.0.1:{port}/0"));
    r.op_timeout = Duration::from_millis(200);
    r.connect_timeout = Duration::from_millis(200);
    r.retry_after = Duration::from_secs(60);
    let cache = cache_with(r);
    let key = identity().key(&toks(1, 10));
    let started = Instant::now();
    for _ in 0..5 {
        assert!(cache.fetch_remote(&[key], TierKind::Ram).is_none());
    }
    // Returns (no hang): at most the failures_to_open attempts each wait
    // out a timeout, then the breaker answers at once.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(get(&cache, Counter::RemoteErrors) >= 1);
    assert!(get(&cache, Counter::RemoteSkipped) >= 1);
    // Saves are never held up for long either.
    let out = cache.save(request(TierKind::Ram, &toks(2, 10), 1000));
    assert!(out.is_ok());
}

#[test]
fn bad_settings_are_refused_at_open() {
    for (prefix, url) in [
        ("a{b", "redis://127.0.0.1:1/0"),
        ("", "redis://127.0.0.1:1/0"),
        ("ok", "http://nope"),
        ("ok", "redis://127.0.0.1:1/notadb"),
    ] {
        let mut r = RemoteConfig::new(url);
        r.prefix = prefix.into();
        let err = Cache::open(CacheConfig {
            remote: Some(r),
            ..CacheConfig::default()
        })
        .expect_err("refused");
        assert!(err.to_string().contains("remote"), "{err}");
    }
    // A server that is down does not stop the cache from opening.
    let port = free_port();
    assert!(Cache::open(CacheConfig {
        remote: Some(RemoteConfig::new(format!("redis://127.0.0.1:{port}/0"))),
        ..CacheConfig::default()
    })
    .is_ok());
}

#[test]
fn saves_on_every_tier_are_written_through() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let cache = with_file_tiers(tmp.path(), true, remote(&server.url()));
    let reader = cache_with(remote(&server.url()));
    for (i, tier) in TierKind::ALL.into_iter().enumerate() {
        let tokens = toks(50 * i as u32, 100);
        let key = cache
            .save(request(tier, &tokens, 30_000))
            .expect("save")
            .key;
        assert_eq!(get(&cache, Counter::RemoteWrites), i as u64 + 1, "{tier}");
        let claim = reader.fetch_remote(&[key], TierKind::Ram).expect("hit");
        let here = cache.claim(&key).expect("local row");
        assert_eq!(
            &claim.load().expect("load")[..],
            &here.load().expect("load")[..]
        );
    }
}

#[test]
fn a_value_larger_than_the_quota_is_deleted_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(tmp.path());
    let mut r = remote(&server.url());
    r.quota = 1 << 20;
    let cache = cache_with(r);
    let key = identity().key(&toks(5, 50));
    let row = format!("{{t}}:row:{}", key.to_hex());
    // 64 MiB under a row key (a string grown by SETRANGE).
    let _: u64 = redis::cmd("SETRANGE")
        .arg(&row)
        .arg(64 << 20)
        .arg("x")
        .query(&mut server.conn())
        .expect("setrange");
    assert!(cache.fetch_remote(&[key], TierKind::Ram).is_none());
    assert_eq!(get(&cache, Counter::RemoteCorrupt), 1);
    assert_eq!(get(&cache, Counter::RemoteBytesRead), 0);
    assert!(!server.holds(&key));
}
