//! A hostile sender's message sequences against a [`Receiver`], for cargo-fuzz.

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use flux_wire::Message;

use crate::{DiskFailure, DiskOp, DiskResult, Event, Receiver, ReceiverConfig, Stream};

/// One step of a hostile peer (or of a flaky disk).
#[derive(Arbitrary, Debug)]
pub enum Step {
    /// A well-formed message on the control stream.
    Control(Message),
    /// Raw bytes on the control stream.
    ControlRaw(Vec<u8>),
    /// A message followed by raw bytes on a data lane.
    Lane(u8, Message, Vec<u8>),
    /// The peer ends a stream.
    End(u8),
    /// Time passes.
    Wait(u16),
    /// The next disk request fails.
    FailDisk,
}

/// Runs `steps` against a receiver that accepts whatever manifest completes. Panics only on a
/// broken invariant of the receiver (which is what the fuzzer looks for).
pub fn receiver_script(steps: Vec<Step>) {
    let mut now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    let mut fail_next = false;
    for step in steps {
        match step {
            Step::Control(m) => {
                let mut b = Vec::new();
                m.encode(&mut b);
                r.handle_stream_data(now, Stream::Control, &b);
            }
            Step::ControlRaw(b) => r.handle_stream_data(now, Stream::Control, &b),
            Step::Lane(n, m, raw) => {
                let mut b = Vec::new();
                m.encode(&mut b);
                b.extend_from_slice(&raw);
                r.handle_stream_data(now, Stream::Lane(u16::from(n % 20)), &b);
            }
            Step::End(n) => {
                let s = if n == 0 {
                    Stream::Control
                } else {
                    Stream::Lane(u16::from(n))
                };
                r.handle_stream_end(now, s);
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(u64::from(ms) * 10);
                r.handle_timeout(now);
            }
            Step::FailDisk => fail_next = true,
        }
        while let Some(op) = r.poll_disk() {
            let id = match op {
                DiskOp::WriteChunk { id, .. }
                | DiskOp::Finalize { id, .. }
                | DiskOp::Finish { id }
                | DiskOp::Read { id, .. } => id,
            };
            let res = if std::mem::take(&mut fail_next) {
                Err(DiskFailure::Io("injected".into()))
            } else {
                Ok(DiskResult::Done)
            };
            r.handle_disk_done(now, id, res);
        }
        while let Some(ev) = r.poll_event() {
            if let Event::ManifestReady = ev {
                r.accept(now, Default::default());
            }
        }
        for s in r.outbox().ready() {
            let n = r.outbox().queued(s);
            r.outbox().advance(s, n);
            let _ = r.outbox().take_fin(s);
        }
    }
}
