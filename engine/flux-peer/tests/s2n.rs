//! The engine's own peer core (`flux_peer::node::Node`) running whole transfers over s2n-quic,
//! on flux-peer's simulated link and virtual clock: the same machines, sessions and end policy
//! as over quinn, only the QUIC stack differs.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::sync::Arc;
use std::time::Instant;

use flux_peer::scan::scan;
use flux_peer::sim::{self, SimConfig, Stop};
use flux_quic_s2n::{Config, Endpoint, Identity, PinSet, S2nEndpoint};

/// A tree of a few files in the smallest chunks, so the transfer has many.
fn tree(dir: &std::path::Path) {
    for i in 0..3u32 {
        let data: Vec<u8> = (0..700_000u32)
            .map(|b| (b.wrapping_mul(2_654_435_761) >> (i + 3)) as u8)
            .collect();
        fs::create_dir_all(dir.join("t")).unwrap();
        fs::write(dir.join(format!("t/f{i}")), data).unwrap();
    }
}

fn endpoints() -> (S2nEndpoint, S2nEndpoint) {
    let (host_id, join_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    // The test is the driver: one clock reading for the endpoints' epoch (the simulator's
    // virtual clock starts later, so it only moves forward for them).
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let cfg = Config::default();
    let host = Endpoint::server(
        sim::HOST_ADDR.parse().unwrap(),
        &host_id,
        PinSet::of(join_id.fingerprint()),
        &cfg,
        now,
    )
    .unwrap();
    let join = Endpoint::client(
        sim::JOIN_ADDR.parse().unwrap(),
        &join_id,
        PinSet::of(host_id.fingerprint()),
        &cfg,
        now,
    )
    .unwrap();
    (host.into(), join.into())
}

fn same_tree(a: &std::path::Path, b: &std::path::Path) {
    for i in 0..3 {
        let f = format!("t/f{i}");
        assert_eq!(
            fs::read(a.join(&f)).unwrap(),
            fs::read(b.join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn a_whole_transfer_runs_on_s2n_through_the_engines_node() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    tree(src.path());
    let share = scan(&[src.path().join("t")], Some(64 << 10)).unwrap();
    let (host, join) = endpoints();
    let o = sim::run_on(
        host,
        join,
        Arc::new(share.manifest),
        share.sources,
        dest.path().to_owned(),
        SimConfig::with_seed(7),
        Stop::Complete,
        None,
    );
    assert!(o.done, "{:?} / {:?}", o.sender_error, o.receiver_error);
    same_tree(src.path(), dest.path());
    assert!(
        o.verified.len() >= 30,
        "{} chunks verified",
        o.verified.len()
    );
}

#[test]
fn an_interrupted_transfer_over_s2n_resumes_without_resending_verified_chunks() {
    let src = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    tree(src.path());
    let run = |stop| {
        let share = scan(&[src.path().join("t")], Some(64 << 10)).unwrap();
        let (host, join) = endpoints();
        sim::run_on(
            host,
            join,
            Arc::new(share.manifest),
            share.sources,
            dest.path().to_owned(),
            SimConfig::with_seed(11),
            stop,
            None,
        )
    };
    let first = run(Stop::AfterVerified(12));
    assert!(first.interrupted, "{first:?}");
    let kept: std::collections::HashSet<_> = first.verified.iter().copied().collect();
    let second = run(Stop::Complete);
    assert!(
        second.done,
        "{:?} / {:?}",
        second.sender_error, second.receiver_error
    );
    same_tree(src.path(), dest.path());
    let again = second.sent.iter().filter(|c| kept.contains(c)).count();
    assert_eq!(again, 0, "{again} verified chunks were sent again");
}
