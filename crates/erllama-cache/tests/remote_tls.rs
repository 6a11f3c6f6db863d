//! The remote tier over TLS (`rediss://`) with a password, against a real
//! `redis-server` started with a certificate from a throwaway CA. The CA
//! is trusted through `SSL_CERT_FILE`, as a deployment with a private CA
//! would do it (the client trusts the system store). Its own process: the
//! variable is set before any TLS client exists.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{request, toks};
use erllama_cache::{Cache, CacheConfig, Counter, RemoteConfig, TierKind};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

fn cache(url: &str) -> Cache {
    let mut r = RemoteConfig::new(url);
    r.retry_after = Duration::from_millis(100);
    Cache::open(CacheConfig {
        remote: Some(r),
        ..CacheConfig::default()
    })
    .expect("open")
}

#[test]
fn rows_travel_over_tls_with_a_password() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
    // SAFETY-free in this process: one test, set before any client exists.
    std::env::set_var("SSL_CERT_FILE", dir.join("ca.pem"));

    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let binary = std::env::var("ERLLAMA_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let mut child = Command::new(&binary)
        .args(["--bind", "127.0.0.1", "--port", "0", "--save", ""])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .args(["--requirepass", "s3cret"])
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {binary} (./dev installs redis-server): {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let url = format!("rediss://:s3cret@127.0.0.1:{port}/0");
    let a = cache(&url);
    let b = cache(&url);
    let key = a
        .save(request(TierKind::Ram, &toks(1, 100), 6_000_000))
        .expect("save")
        .key;
    assert_eq!(a.counters().get(Counter::RemoteWrites), 1);
    let claim = b.fetch_remote(&[key], TierKind::Ram).expect("hit over TLS");
    assert_eq!(claim.tokens(), &toks(1, 100)[..]);

    // A wrong password or plain TCP to a TLS port: errors, counted, never a hit.
    for bad in [
        format!("rediss://:wrong@127.0.0.1:{port}/0"),
        format!("redis://:s3cret@127.0.0.1:{port}/0"),
    ] {
        let c = cache(&bad);
        assert!(c.fetch_remote(&[key], TierKind::Ram).is_none(), "{bad}");
        assert!(c.counters().get(Counter::RemoteErrors) >= 1, "{bad}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
