//! The real `thru` binary through a fleet of real `thruserv` processes sharing a real
//! `redis-server`: a host on one instance and a joiner on another pair and transfer a file
//! byte-identical, first pinned to an instance each, then through HAProxy (round-robin,
//! WebSocket upgrade) with no pinning. Skips where redis-server or haproxy is missing.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../thruserv/tests/common/fleet.rs"]
mod fleet;

use common::{Proc, Thruserv};
use fleet::{Haproxy, Redis};

/// A host sending `data` through `host_url` and a joiner receiving through `join_url`;
/// returns what the joiner wrote.
fn transfer(host_url: &str, join_url: &str, data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, data).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut host = Proc::spawn(
        &[
            "host",
            "--json",
            "--max-receivers",
            "1",
            file.to_str().unwrap(),
        ],
        &[("THRU_SERVER_URL", host_url)],
    );
    let code = host.event("code");
    assert_eq!(code["mode"], "server");
    let mut joiner = Proc::spawn(
        &[
            "join",
            "--json",
            "--yes",
            "--out",
            out.path().to_str().unwrap(),
            "--server",
            join_url,
            code["code"].as_str().unwrap(),
        ],
        &[],
    );
    let jp = joiner.event("peer");
    let hp = host.event("peer");
    assert_eq!(jp["fingerprint"], hp["local_fingerprint"]);
    assert_eq!(hp["fingerprint"], jp["local_fingerprint"]);
    for p in [&mut joiner, &mut host] {
        p.event("summary");
        assert_eq!(p.wait(), 0);
    }
    std::fs::read(out.path().join("payload.bin")).unwrap()
}

#[test]
fn a_file_crosses_instances_byte_identical_pinned_and_through_haproxy() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let a = Thruserv::start(&["--redis", &url]);
    let b = Thruserv::start(&["--redis", &url]);
    // Not a multiple of any chunk size, and not all one byte value.
    let data: Vec<u8> = (0..300_001u32).map(|i| (i * 7 + i / 251) as u8).collect();

    assert_eq!(transfer(&a.url(), &b.url(), &data), data, "pinned A -> B");

    let Some(lb) = Haproxy::start(&[a.addr, b.addr]) else {
        return;
    };
    assert_eq!(
        transfer(&lb.url(), &lb.url(), &data),
        data,
        "through haproxy"
    );
}
