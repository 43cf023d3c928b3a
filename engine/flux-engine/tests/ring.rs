//! Ring ownership rules: resources of in-flight ops outlive dropped handles and a dropped ring;
//! timers; timeouts of submit_and_wait.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use flux_engine::{AlignedBuf, Ring, RingConfig, RingSetup};
use io_uring::{opcode, types};

/// Sets a flag when dropped.
struct DropProbe(Rc<Cell<bool>>);

impl Drop for DropProbe {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

fn ring() -> Option<Ring> {
    match Ring::new(&RingConfig::default()) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("SKIP: {e}");
            None
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Pushes a read of up to 64 bytes from `fd` into an owned buffer plus a drop probe.
fn push_read(
    ring: &mut Ring,
    fd: &OwnedFd,
    flag: &Rc<Cell<bool>>,
) -> flux_engine::Op<(AlignedBuf, DropProbe)> {
    let buf = AlignedBuf::new(64, 64).expect("buf");
    let raw = fd.as_raw_fd();
    // SAFETY: the SQE points into the owned buffer (64 bytes capacity); the pipe fd outlives
    // the op in every test below.
    unsafe {
        ring.push((buf, DropProbe(flag.clone())), |(b, _)| {
            opcode::Read::new(types::Fd(raw), b.as_mut_ptr(), 64)
                .offset(u64::MAX)
                .build()
        })
    }
    .expect("push")
}

#[test]
fn setup_single_issuer() {
    let Some(r) = ring() else { return };
    // Linux ≥ 6.1 (the dev VM runs 6.18) accepts it; older kernels fall back.
    eprintln!("ring setup: {:?}", r.setup());
    assert!(matches!(
        r.setup(),
        RingSetup::SingleIssuer | RingSetup::Plain
    ));
}

#[test]
fn dropped_op_keeps_buffer_until_cqe() {
    let Some(mut ring) = ring() else { return };
    if !ring.supports(opcode::Read::CODE) {
        eprintln!("SKIP: kernel lacks IORING_OP_READ");
        return;
    }
    let (r, w) = pipe();
    let dropped = Rc::new(Cell::new(false));
    let op = push_read(&mut ring, &r, &dropped);
    ring.submit_and_wait(0, Some(Duration::from_millis(10)))
        .expect("submit");
    drop(op);
    assert!(
        !dropped.get(),
        "resources must survive the handle while the read is pending"
    );
    assert_eq!(ring.in_flight(), 1);
    // SAFETY: writes 5 bytes from a live array to the pipe's write end.
    assert_eq!(
        unsafe { libc::write(w.as_raw_fd(), b"hello".as_ptr().cast(), 5) },
        5
    );
    ring.submit_and_wait(1, Some(Duration::from_secs(5)))
        .expect("wait");
    assert!(dropped.get(), "freed once the CQE arrived");
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn completed_op_returns_data() {
    let Some(mut ring) = ring() else { return };
    let (r, w) = pipe();
    let dropped = Rc::new(Cell::new(false));
    let op = push_read(&mut ring, &r, &dropped);
    // SAFETY: writes 3 bytes from a live array.
    assert_eq!(
        unsafe { libc::write(w.as_raw_fd(), b"abc".as_ptr().cast(), 3) },
        3
    );
    let c = ring.wait(op).expect("wait");
    assert_eq!(c.result.expect("read"), 3);
    let (mut buf, _probe) = c.data;
    buf.set_len(3);
    assert_eq!(&buf[..], b"abc");
}

#[test]
fn dropping_ring_with_ops_in_flight_waits_for_them() {
    let Some(mut ring) = ring() else { return };
    let (r, _w) = pipe();
    let kept = Rc::new(Cell::new(false));
    let ignored = Rc::new(Cell::new(false));
    let op = push_read(&mut ring, &r, &kept);
    drop(push_read(&mut ring, &r, &ignored));
    ring.submit().expect("submit");
    assert!(!kept.get() && !ignored.get());
    // The ring cancels both pending reads and waits for their CQEs: the ignored op's resources
    // are freed then, the other's move to its handle, which may outlive the ring.
    drop(ring);
    assert!(ignored.get(), "ignored op freed after its cancelled CQE");
    assert!(!kept.get());
    assert!(op.is_complete());
    let c = op.try_complete().ok().expect("complete");
    assert_eq!(
        c.result.as_ref().expect_err("cancelled").raw_os_error(),
        Some(libc::ECANCELED)
    );
    drop(c);
    assert!(kept.get());
}

#[test]
fn timer_and_wait_timeout() {
    let Some(mut ring) = ring() else { return };
    if !ring.supports(opcode::Timeout::CODE) {
        eprintln!("SKIP: kernel lacks IORING_OP_TIMEOUT");
        return;
    }
    // Nothing in flight: a bounded wait returns after its timeout with nothing reaped.
    let t0 = Instant::now();
    assert_eq!(
        ring.submit_and_wait(1, Some(Duration::from_millis(20)))
            .expect("w"),
        0
    );
    // A lower bound only (the wait must not return early); slowness cannot fail it.
    assert!(t0.elapsed() >= Duration::from_millis(15));
    let t = ring.timeout(Duration::from_millis(10)).expect("timer");
    let c = ring.wait(t).expect("wait");
    assert_eq!(
        c.result.expect_err("timer fires with ETIME").raw_os_error(),
        Some(libc::ETIME)
    );
}

#[test]
fn many_timers_in_flight() {
    let Some(mut ring) = ring() else { return };
    // More ops than SQ entries: push submits to make room.
    let ops: Vec<_> = (0..600)
        .map(|i| ring.timeout(Duration::from_micros(100 + i)).expect("timer"))
        .collect();
    assert!(ring.in_flight() >= 600);
    for op in ops {
        let c = ring.wait(op).expect("wait");
        assert!(c.result.is_err());
    }
    assert_eq!(ring.in_flight(), 0);
}
