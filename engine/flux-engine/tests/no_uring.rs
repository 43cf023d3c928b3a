//! io_uring missing (simulated with `FLUX_ENGINE_NO_URING=1`): the ring refuses, `DiskIo::auto`
//! falls back to the blocking backend, and file I/O still works. Its own test binary, so the
//! environment change cannot leak into other tests.

use flux_engine::{BackendKind, DiskIo, DmaFile, EngineError, Ring, RingConfig};

#[test]
fn missing_io_uring_falls_back_to_std() {
    // SAFETY: this binary has a single test, so no other thread reads the environment.
    unsafe { std::env::set_var("FLUX_ENGINE_NO_URING", "1") };
    assert!(matches!(
        Ring::new(&RingConfig::default()),
        Err(EngineError::UringUnavailable { .. })
    ));
    assert!(DiskIo::new(BackendKind::Uring).is_err());
    let mut io = DiskIo::auto();
    assert_eq!(io.kind(), BackendKind::Std);
    assert!(io.ring().is_none());

    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("f");
    let file = DmaFile::create(&path).expect("create");
    let mut buf = file.alloc_buf(8192).expect("buf");
    buf.extend_from_slice(b"hello, portable driver");
    let op = io.write_at(&file, buf, 0).expect("write");
    assert!(op.is_complete(), "std backend completes at submission");
    let (r, _) = io.wait(op).expect("wait");
    assert_eq!(r.expect("write"), 22);
    let buf = file.alloc_buf(4096).expect("buf");
    let op = io.read_at(&file, buf, 0, 4096).expect("read");
    let (r, buf) = io.wait(op).expect("wait");
    assert_eq!(r.expect("read"), 22);
    assert_eq!(&buf[..], b"hello, portable driver");
}
