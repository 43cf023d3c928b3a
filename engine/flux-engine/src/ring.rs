//! The per-core io_uring wrapper: setup with fallback, submission, completion reaping,
//! `user_data` → slot mapping and ownership of in-flight resources.
//!
//! # Ownership model
//!
//! Every operation is pushed together with the resources its SQE points into (buffers, the
//! file descriptor, a `msghdr`, a `Timespec`). The ring boxes them in a slot and hands back an
//! [`Op`] handle. The resources leave the slot only after the CQE has arrived:
//!
//! - [`Op::try_complete`] / [`Ring::wait`] return them with the result;
//! - dropping the [`Op`] early marks the slot *ignored*: the resources stay until the CQE
//!   arrives, then are dropped (tokio-uring's `Lifecycle::Ignored`, simplified: one thread owns
//!   the ring, so a `RefCell` replaces its locking and wakers);
//! - dropping the [`Ring`] with operations in flight cancels them and waits for their CQEs
//!   before anything is freed. If the kernel stops answering, the resources are leaked rather
//!   than freed under it.

use std::any::Any;
use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, squeue, types};

use crate::EngineError;
use crate::buf::{BufPool, PoolShared};

/// Options for [`Ring::new`].
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// Submission queue entries (the completion queue gets twice as many).
    pub entries: u32,
    /// Ask for `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (falls back to a plain
    /// ring with a one-time warning when the kernel refuses).
    pub single_issuer: bool,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            single_issuer: true,
        }
    }
}

/// How the ring was set up.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG`: completions run only when this thread
    /// enters the kernel to wait, which batches them and avoids IPIs (platform facts §6).
    SingleIssuer,
    /// A default ring.
    Plain,
}

/// One io_uring owned by one thread. Not `Send`: a ring and its ops live on the thread that
/// created them (which `SINGLE_ISSUER` requires anyway).
pub struct Ring {
    uring: IoUring,
    slots: Rc<RefCell<Slots>>,
    setup: RingSetup,
    /// Boxed: 2 KiB of opcode table.
    probe: Box<Probe>,
    id: u64,
    /// Keeps registered buffer memory alive for the ring's life.
    registered: Option<Rc<PoolShared>>,
}

/// Handle to an operation in flight; `T` is the resources it owns. See the module docs for what
/// dropping it does.
#[must_use = "dropping an Op ignores its result (its resources are freed after the CQE)"]
pub struct Op<T: 'static> {
    slots: Rc<RefCell<Slots>>,
    idx: u32,
    generation: u32,
    _owns: PhantomData<T>,
}

/// A finished operation: the kernel's result and the resources it owned.
#[derive(Debug)]
pub struct Completion<T> {
    /// Non-negative CQE result, or the error the kernel returned.
    pub result: io::Result<u32>,
    /// CQE flags (`IORING_CQE_F_*`).
    pub flags: u32,
    /// The resources pushed with the operation.
    pub data: T,
}

/// Resources of a timer op (see [`Ring::timeout`]).
#[derive(Debug)]
pub struct Timer {
    ts: types::Timespec,
}

impl Ring {
    /// Creates a ring. Fails with [`EngineError::UringUnavailable`] when io_uring cannot be
    /// used at all, or when `FLUX_ENGINE_NO_URING=1` simulates that.
    pub fn new(cfg: &RingConfig) -> Result<Self, EngineError> {
        if std::env::var_os("FLUX_ENGINE_NO_URING").is_some_and(|v| v != "0") {
            return Err(EngineError::UringUnavailable {
                reason: "disabled by FLUX_ENGINE_NO_URING".into(),
            });
        }
        let entries = cfg.entries.max(2);
        let mut setup = RingSetup::Plain;
        let mut uring = None;
        if cfg.single_issuer {
            match IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_cqsize(entries * 2)
                .build(entries)
            {
                Ok(u) => {
                    uring = Some(u);
                    setup = RingSetup::SingleIssuer;
                }
                Err(e) => {
                    warn_once!(
                        error = %e,
                        "io_uring SINGLE_ISSUER|DEFER_TASKRUN refused; using a plain ring"
                    );
                }
            }
        }
        let uring = match uring {
            Some(u) => u,
            None => IoUring::builder()
                .setup_cqsize(entries * 2)
                .build(entries)
                .map_err(|e| EngineError::UringUnavailable {
                    reason: e.to_string(),
                })?,
        };
        let mut probe = Box::new(Probe::new());
        if let Err(e) = uring.submitter().register_probe(&mut probe) {
            warn_once!(error = %e, "io_uring probe failed; assuming no optional opcodes");
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            uring,
            slots: Rc::new(RefCell::new(Slots::default())),
            setup,
            probe,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registered: None,
        })
    }

    /// Pushes an operation that owns `data`.
    ///
    /// `data` is moved to the heap first and `build` is then called with a reference to it
    /// there, so the SQE may point anywhere inside `data` (even into its inline fields): that
    /// memory stays put and alive until the CQE has been reaped. The SQE is queued, not yet
    /// submitted; a full submission queue is submitted first to make room.
    ///
    /// # Safety
    ///
    /// Every pointer in the returned SQE must point into `data` or into memory that otherwise
    /// outlives the operation, and the memory the kernel writes must not be read or written
    /// through other paths until completion. File descriptors in the SQE must stay open until
    /// completion (keep an owner of the fd in `data`).
    pub unsafe fn push<T: 'static>(
        &mut self,
        data: T,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> Result<Op<T>, EngineError> {
        let mut boxed = Box::new(data);
        let entry = build(&mut boxed);
        let (idx, generation) = self.slots.borrow_mut().insert(boxed);
        let entry = entry.user_data(user_data(idx, generation));
        // SAFETY: the caller guarantees the SQE's pointers stay valid until completion; the
        // resources they point into now live in slot `idx`, which releases them only after the
        // CQE carrying this user_data has been reaped (or leaks them).
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            self.submit_pending()?;
            // SAFETY: as above.
            if unsafe { self.uring.submission().push(&entry) }.is_err() {
                // Never reached the kernel: safe to free now.
                drop(self.slots.borrow_mut().remove(idx));
                return Err(EngineError::SubmissionQueueFull);
            }
        }
        Ok(Op {
            slots: self.slots.clone(),
            idx,
            generation,
            _owns: PhantomData,
        })
    }

    /// Queues a timer that completes after `after` (with `ETIME` as its result, the normal
    /// outcome of an io_uring timeout).
    pub fn timeout(&mut self, after: Duration) -> Result<Op<Timer>, EngineError> {
        let timer = Timer {
            ts: types::Timespec::from(after),
        };
        // SAFETY: the SQE points only at `t.ts`, inside the data the op owns.
        unsafe { self.push(timer, |t| opcode::Timeout::new(&raw const t.ts).build()) }
    }

    /// Queues a one-shot readiness poll of `fd` for `events` (`libc::POLLIN` etc.); the result
    /// is the ready mask. The descriptor must stay open until the op completes or is dropped
    /// (a closed descriptor yields an error completion, never memory unsafety).
    pub fn poll_add(&mut self, fd: RawFd, events: u32) -> Result<Op<()>, EngineError> {
        // SAFETY: a poll SQE carries no pointers, only the descriptor number and mask.
        unsafe { self.push((), |_| opcode::PollAdd::new(types::Fd(fd), events).build()) }
    }

    /// Submits queued SQEs, waits until at least `want` completions were reaped (or `timeout`
    /// passed), and moves every available CQE into its slot. Returns the number reaped.
    pub fn submit_and_wait(
        &mut self,
        want: usize,
        timeout: Option<Duration>,
    ) -> Result<usize, EngineError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut reaped = self.reap();
        loop {
            let need = want.saturating_sub(reaped);
            let res = match deadline {
                _ if need == 0 => self.uring.submitter().submit(),
                None => self.uring.submitter().submit_and_wait(need),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.uring.submitter().submit_with_args(need, &args)
                }
            };
            match res {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    // ETIME: the wait timed out; EINTR: a signal; EBUSY: the CQ overflowed and
                    // must be drained first (reap below does that).
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                    _ => return Err(EngineError::io("io_uring_enter", None, None, e)),
                },
            }
            reaped += self.reap();
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            if reaped >= want || timed_out {
                return Ok(reaped);
            }
        }
    }

    /// Submits queued SQEs without waiting.
    pub fn submit(&mut self) -> Result<usize, EngineError> {
        self.submit_pending()
    }

    /// Blocks until `op` completes and returns its completion.
    pub fn wait<T: 'static>(&mut self, mut op: Op<T>) -> Result<Completion<T>, EngineError> {
        loop {
            match op.try_complete() {
                Ok(c) => return Ok(c),
                Err(o) => op = o,
            }
            self.submit_and_wait(1, None)?;
        }
    }

    /// Registers `pool`'s buffers as io_uring fixed buffers (`READ_FIXED`/`WRITE_FIXED` then
    /// skip per-I/O page pinning). Returns whether it worked: a ring registers one pool; more
    /// than 16384 buffers or a memory-lock limit (`RLIMIT_MEMLOCK` is 8 MiB for non-root users,
    /// platform pitfall 8) makes it fall back to unregistered use with a one-time warning.
    pub fn register_pool(&mut self, pool: &BufPool) -> bool {
        let shared = pool.shared();
        if self.registered.is_some() || shared.registered_ring().is_some() {
            return false;
        }
        if shared.count() > MAX_REGISTERED_BUFFERS {
            warn_once!(
                count = shared.count(),
                "buffer pool too large to register with io_uring; using unregistered buffers"
            );
            return false;
        }
        let iovecs = shared.iovecs();
        // SAFETY: the iovecs describe the pool's single allocation, which `self.registered`
        // keeps alive (Rc) until the ring is dropped, i.e. until the registration ends.
        match unsafe { self.uring.submitter().register_buffers(&iovecs) } {
            Ok(()) => {
                shared.set_registered_ring(self.id);
                self.registered = Some(shared.clone());
                true
            }
            Err(e) => {
                warn_once!(
                    error = %e,
                    bytes = shared.count() * shared.buf_size(),
                    "io_uring buffer registration refused (RLIMIT_MEMLOCK?); using unregistered buffers"
                );
                false
            }
        }
    }

    /// Whether the kernel supports `opcode` (e.g. `io_uring::opcode::Read::CODE`).
    pub fn supports(&self, opcode: u8) -> bool {
        self.probe.is_supported(opcode)
    }

    /// How the ring was set up.
    pub fn setup(&self) -> RingSetup {
        self.setup
    }

    /// Operations pushed and not yet reaped (including ignored ones).
    pub fn in_flight(&self) -> usize {
        self.slots.borrow().in_flight
    }

    /// Identity of this ring (to match registered buffers against).
    pub fn id(&self) -> u64 {
        self.id
    }

    fn submit_pending(&mut self) -> Result<usize, EngineError> {
        loop {
            match self.uring.submitter().submit() {
                Ok(n) => return Ok(n),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.reap();
                }
                Err(e) => return Err(EngineError::io("io_uring_enter", None, None, e)),
            }
        }
    }

    fn reap(&mut self) -> usize {
        let mut n = 0;
        let mut slots = self.slots.borrow_mut();
        for cqe in self.uring.completion() {
            if cqe.user_data() == INTERNAL {
                continue;
            }
            slots.complete(cqe.user_data(), cqe.result(), cqe.flags());
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight() == 0 {
            return;
        }
        // Cancel everything and wait for every CQE before the slots (and the buffers the kernel
        // may still write) can be freed.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(INTERNAL);
        // SAFETY: a cancel SQE carries no pointers.
        let _ = unsafe { self.uring.submission().push(&cancel) };
        let deadline = Instant::now() + DROP_WAIT;
        while self.in_flight() > 0 && Instant::now() < deadline {
            if self
                .submit_and_wait(1, Some(Duration::from_millis(100)))
                .is_err()
            {
                break;
            }
        }
        let left = self.in_flight();
        if left > 0 {
            tracing::error!(
                left,
                "io_uring ops still in flight at ring drop; leaking their buffers"
            );
            self.slots.borrow_mut().leak_in_flight();
        }
    }
}

impl<T: 'static> Op<T> {
    /// Whether the CQE has arrived.
    pub fn is_complete(&self) -> bool {
        let slots = self.slots.borrow();
        matches!(
            slots.get(self.idx, self.generation),
            Some(State::Done { .. })
        )
    }

    /// Takes the completion if the CQE has arrived; otherwise gives the handle back.
    pub fn try_complete(mut self) -> Result<Completion<T>, Self> {
        let taken = {
            let mut slots = self.slots.borrow_mut();
            match slots.get(self.idx, self.generation) {
                Some(State::Done { .. }) => slots.remove(self.idx),
                _ => None,
            }
        };
        let Some(State::Done {
            result,
            flags,
            data,
        }) = taken
        else {
            return Err(self);
        };
        self.idx = u32::MAX; // Drop: nothing left to release.
        // Invariant: slot `idx` of generation `generation` was filled by `Ring::push::<T>`
        // with a `Box<T>`, so the downcast cannot fail.
        let data = *data
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("op slot holds the pushed type"));
        let result = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result as u32)
        };
        Ok(Completion {
            result,
            flags,
            data,
        })
    }

    /// The `user_data` the SQE carries.
    pub fn user_data(&self) -> u64 {
        user_data(self.idx, self.generation)
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        if self.idx == u32::MAX {
            return;
        }
        let released = {
            let mut slots = self.slots.borrow_mut();
            slots.release(self.idx, self.generation)
        };
        // Dropped outside the borrow: the resources' own Drop may touch anything.
        drop(released);
    }
}

#[derive(Default)]
struct Slots {
    entries: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
}

struct Slot {
    generation: u32,
    state: State,
}

enum State {
    Free,
    InFlight(Box<dyn Any>),
    /// The handle was dropped: free the resources when the CQE arrives.
    Ignored(Box<dyn Any>),
    Done {
        result: i32,
        flags: u32,
        data: Box<dyn Any>,
    },
}

impl Slots {
    fn insert(&mut self, data: Box<dyn Any>) -> (u32, u32) {
        self.in_flight += 1;
        if let Some(idx) = self.free.pop() {
            let slot = &mut self.entries[idx as usize];
            slot.generation = slot.generation.wrapping_add(1);
            slot.state = State::InFlight(data);
            (idx, slot.generation)
        } else {
            self.entries.push(Slot {
                generation: 0,
                state: State::InFlight(data),
            });
            ((self.entries.len() - 1) as u32, 0)
        }
    }

    fn get(&self, idx: u32, generation: u32) -> Option<&State> {
        self.entries
            .get(idx as usize)
            .filter(|s| s.generation == generation)
            .map(|s| &s.state)
    }

    fn remove(&mut self, idx: u32) -> Option<State> {
        let slot = self.entries.get_mut(idx as usize)?;
        let state = std::mem::replace(&mut slot.state, State::Free);
        if matches!(state, State::InFlight(_) | State::Ignored(_)) {
            self.in_flight -= 1;
        }
        self.free.push(idx);
        Some(state)
    }

    /// The handle went away: returns resources that may be dropped now.
    fn release(&mut self, idx: u32, generation: u32) -> Option<State> {
        let slot = self.entries.get_mut(idx as usize)?;
        if slot.generation != generation {
            return None;
        }
        match std::mem::replace(&mut slot.state, State::Free) {
            State::InFlight(data) => {
                slot.state = State::Ignored(data);
                None
            }
            State::Free => None,
            done => {
                self.free.push(idx);
                Some(done)
            }
        }
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        let (idx, generation) = ((user_data & 0xffff_ffff) as u32, (user_data >> 32) as u32);
        let Some(slot) = self.entries.get_mut(idx as usize) else {
            tracing::error!(user_data, "CQE for an unknown io_uring slot");
            return;
        };
        if slot.generation != generation {
            tracing::error!(user_data, "CQE for a stale io_uring slot");
            return;
        }
        match std::mem::replace(&mut slot.state, State::Free) {
            State::InFlight(data) => {
                self.in_flight -= 1;
                slot.state = State::Done {
                    result,
                    flags,
                    data,
                };
            }
            State::Ignored(data) => {
                self.in_flight -= 1;
                self.free.push(idx);
                drop(data);
            }
            other => {
                tracing::error!(
                    user_data,
                    "second CQE for an io_uring slot (multishot unsupported)"
                );
                slot.state = other;
            }
        }
    }

    fn leak_in_flight(&mut self) {
        for slot in &mut self.entries {
            if let State::InFlight(d) | State::Ignored(d) =
                std::mem::replace(&mut slot.state, State::Free)
            {
                std::mem::forget(d);
            }
        }
        self.in_flight = 0;
    }
}

fn user_data(idx: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(idx)
}

/// `user_data` of the ring's own operations (cancellation), whose CQEs are skipped.
const INTERNAL: u64 = u64::MAX;

/// How long [`Ring`]'s drop waits for cancelled operations before leaking their resources.
const DROP_WAIT: Duration = Duration::from_secs(10);

/// Kernel limit on registered buffers (`IORING_MAX_REG_BUFFERS`).
const MAX_REGISTERED_BUFFERS: usize = 1 << 14;
