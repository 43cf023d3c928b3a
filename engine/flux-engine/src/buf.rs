//! Aligned buffers for O_DIRECT, a fixed-size pool of them that can be registered with
//! io_uring, and a [`Recycler`] that lets a heap buffer become [`Bytes`] without a copy and
//! come back for reuse once every `Bytes` of it is dropped, on whatever thread.

use std::alloc::{self, Layout};
use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::EngineError;

/// A heap buffer whose start and capacity are multiples of an alignment (for O_DIRECT).
///
/// `len` is the number of valid bytes (what `Deref` shows, what a write sends, what a read
/// filled); `capacity` is the allocated size. Memory is zero-initialised at allocation, so the
/// whole capacity is always initialised. A pooled buffer returns to its pool when dropped.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    owner: Owner,
}

enum Owner {
    Alloc(Layout),
    Pool { pool: Rc<PoolShared>, index: u16 },
}

impl AlignedBuf {
    /// Allocates `capacity` bytes (rounded up to `align`) aligned to `align` (a power of two).
    pub fn new(capacity: usize, align: usize) -> Result<Self, EngineError> {
        let layout = layout(capacity, align)?;
        // SAFETY: `layout` has non-zero size (layout() guarantees at least `align` bytes).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| oom("AlignedBuf::new"))?;
        Ok(Self {
            ptr,
            cap: layout.size(),
            len: 0,
            owner: Owner::Alloc(layout),
        })
    }

    /// Allocated size in bytes (a multiple of the alignment).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the number of valid bytes. Panics if `len > capacity`.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Empties the buffer (capacity unchanged).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends as much of `data` as fits; returns how many bytes were taken.
    pub fn extend_from_slice(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.cap - self.len);
        let start = self.len;
        self.full_mut()[start..start + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// The whole capacity, valid or not (it is always initialised).
    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `cap` initialised bytes (zeroed at allocation, only ever written
        // since), exclusively borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the buffer, for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The io_uring fixed-buffer index, if this buffer belongs to a pool registered with the
    /// ring `ring_id`.
    pub fn fixed_index(&self, ring_id: u64) -> Option<u16> {
        match &self.owner {
            Owner::Pool { pool, index } if pool.registered.get() == Some(ring_id) => Some(*index),
            _ => None,
        }
    }
}

impl AlignedBuf {
    /// Turns the valid bytes into [`Bytes`] without copying. The memory returns to `home` when
    /// the last `Bytes` referring to it is dropped. Only heap buffers can be frozen: a buffer
    /// of a [`BufPool`] (tied to its thread and ring) comes back as `Err`.
    pub fn freeze(self, home: &Recycler) -> Result<Bytes, AlignedBuf> {
        let Owner::Alloc(layout) = self.owner else {
            return Err(self);
        };
        let frozen = Frozen {
            block: Some(Block {
                ptr: self.ptr,
                layout,
            }),
            len: self.len,
            home: Arc::clone(&home.free),
            max: home.max,
        };
        // The block now belongs to `frozen`, which frees or recycles it.
        std::mem::forget(self);
        Ok(Bytes::from_owner(frozen))
    }
}

/// Heap blocks of frozen [`AlignedBuf`]s, back from [`Bytes`] that were dropped, for reuse: a
/// sender's chunk buffers go to QUIC as `Bytes` and return here once acknowledged, so the
/// steady state allocates (and page-faults) nothing.
#[derive(Clone)]
pub struct Recycler {
    free: Arc<Mutex<Vec<Block>>>,
    max: usize,
}

impl Recycler {
    /// A recycler keeping at most `max` blocks; more are freed.
    pub fn new(max: usize) -> Self {
        Self {
            free: Arc::new(Mutex::new(Vec::new())),
            max,
        }
    }

    /// A returned block of at least `capacity` bytes aligned to `align`, as an empty buffer.
    pub fn take(&self, capacity: usize, align: usize) -> Option<AlignedBuf> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let i = free
            .iter()
            .position(|b| b.layout.size() >= capacity && b.layout.align() >= align)?;
        // The buffer takes over the allocation: the block must not free it.
        let b = std::mem::ManuallyDrop::new(free.swap_remove(i));
        Some(AlignedBuf {
            ptr: b.ptr,
            cap: b.layout.size(),
            len: 0,
            owner: Owner::Alloc(b.layout),
        })
    }

    /// Blocks waiting for reuse.
    pub fn available(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

impl std::fmt::Debug for Recycler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recycler")
            .field("available", &self.available())
            .field("max", &self.max)
            .finish()
    }
}

/// One heap allocation made by [`AlignedBuf::new`], zero-initialised at allocation.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a `Block` is the sole owner of its heap allocation (nothing else points into it), so
// moving it to another thread moves that ownership; the allocator is thread-safe.
unsafe impl Send for Block {}

/// The owner behind a frozen buffer's [`Bytes`].
struct Frozen {
    block: Option<Block>,
    len: usize,
    home: Arc<Mutex<Vec<Block>>>,
    max: usize,
}

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        match &self.block {
            // SAFETY: the block holds `cap >= len` initialised bytes (zeroed at allocation,
            // written since only through `&mut AlignedBuf`); once frozen nothing writes to it
            // until it is dropped, so shared reads are sound.
            Some(b) => unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let Some(b) = self.block.take() else { return };
        let mut free = self.home.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max {
            free.push(b);
        } else {
            drop(free);
            drop(b);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // A block past the recycler's limit, or still in a recycler when that is dropped.
        // SAFETY: a block solely owns its allocation, made by `AlignedBuf::new` with exactly
        // `layout`; blocks handed back to an `AlignedBuf` are not dropped (ManuallyDrop).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len <= cap` initialised bytes owned by `self`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match &self.owner {
            // SAFETY: allocated in `new` with exactly this layout, freed once.
            Owner::Alloc(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), *layout) },
            Owner::Pool { pool, index } => pool.free.borrow_mut().push(*index),
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

/// A pool of `count` buffers of `buf_size` bytes carved from one aligned allocation, so the
/// whole pool can be registered with io_uring ([`Ring::register_pool`](crate::Ring::register_pool)).
/// Cloning shares the pool.
#[derive(Clone)]
pub struct BufPool {
    shared: Rc<PoolShared>,
}

/// The pool's memory and free list, shared by the pool, its buffers and a ring that registered
/// it (the memory lives until the last of them is gone).
pub(crate) struct PoolShared {
    base: NonNull<u8>,
    layout: Layout,
    buf_size: usize,
    count: usize,
    free: RefCell<Vec<u16>>,
    registered: Cell<Option<u64>>,
}

impl BufPool {
    /// Allocates `count` (≤ 65536) buffers of `buf_size` bytes (rounded up to `align`).
    pub fn new(count: usize, buf_size: usize, align: usize) -> Result<Self, EngineError> {
        let count = count.clamp(1, usize::from(u16::MAX) + 1);
        let one = layout(buf_size, align)?;
        let total = one
            .size()
            .checked_mul(count)
            .ok_or_else(|| oom("BufPool::new"))?;
        let layout =
            Layout::from_size_align(total, one.align()).map_err(|_| oom("BufPool::new"))?;
        // SAFETY: non-zero size (count ≥ 1, one.size() ≥ align ≥ 1).
        let base = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(base).ok_or_else(|| oom("BufPool::new"))?;
        // Hand out low indices first.
        let free = (0..count).rev().map(|i| i as u16).collect();
        Ok(Self {
            shared: Rc::new(PoolShared {
                base,
                layout,
                buf_size: one.size(),
                count,
                free: RefCell::new(free),
                registered: Cell::new(None),
            }),
        })
    }

    /// Takes a free buffer (empty, `len` 0), or `None` when all are in use.
    pub fn get(&self) -> Option<AlignedBuf> {
        let index = self.shared.free.borrow_mut().pop()?;
        // SAFETY: index < count, so the offset stays inside the pool's allocation.
        let ptr = unsafe {
            self.shared
                .base
                .add(usize::from(index) * self.shared.buf_size)
        };
        Some(AlignedBuf {
            ptr,
            cap: self.shared.buf_size,
            len: 0,
            owner: Owner::Pool {
                pool: self.shared.clone(),
                index,
            },
        })
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.shared.free.borrow().len()
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.shared.buf_size
    }

    /// Whether the pool is registered with a ring.
    pub fn is_registered(&self) -> bool {
        self.shared.registered.get().is_some()
    }

    pub(crate) fn shared(&self) -> &Rc<PoolShared> {
        &self.shared
    }
}

impl PoolShared {
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: i < count: inside the allocation.
                iov_base: unsafe { self.base.add(i * self.buf_size) }.as_ptr().cast(),
                iov_len: self.buf_size,
            })
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub(crate) fn registered_ring(&self) -> Option<u64> {
        self.registered.get()
    }

    pub(crate) fn set_registered_ring(&self, id: u64) {
        self.registered.set(Some(id));
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // SAFETY: allocated in BufPool::new with this layout; the last owner (pool, buffer or
        // registering ring) is going away, so nothing references the memory any more.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

fn layout(size: usize, align: usize) -> Result<Layout, EngineError> {
    let align = align.max(1);
    let size = size.max(1).div_ceil(align).checked_mul(align);
    size.and_then(|s| Layout::from_size_align(s, align).ok())
        .ok_or_else(|| oom("layout"))
}

fn oom(op: &'static str) -> EngineError {
    EngineError::io(
        op,
        None,
        None,
        std::io::Error::from(std::io::ErrorKind::OutOfMemory),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_pooled() {
        let mut b = AlignedBuf::new(1000, 4096).expect("alloc");
        assert_eq!(b.capacity(), 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.extend_from_slice(&[7; 5000]), 4096);
        assert!(b.iter().all(|&x| x == 7));

        let pool = BufPool::new(4, 5000, 512).expect("pool");
        assert_eq!(pool.buf_size(), 5120);
        let bufs: Vec<_> = (0..4).map(|_| pool.get().expect("free")).collect();
        assert!(pool.get().is_none());
        for b in &bufs {
            assert_eq!(b.as_ptr() as usize % 512, 0);
        }
        drop(bufs);
        assert_eq!(pool.available(), 4);
        // A buffer outliving its pool handle keeps the memory alive.
        let b = pool.get().expect("free");
        drop(pool);
        assert_eq!(b.capacity(), 5120);
    }
}

#[cfg(test)]
mod recycle_tests {
    use super::*;

    #[test]
    fn a_frozen_buffer_reads_back_and_returns_to_its_recycler() {
        let home = Recycler::new(4);
        let mut b = AlignedBuf::new(8192, 4096).unwrap();
        b.extend_from_slice(b"hello, chunk");
        let ptr = b.as_ptr();
        let bytes = b.freeze(&home).unwrap();
        assert_eq!(&bytes[..], b"hello, chunk");
        let part = bytes.slice(7..);
        drop(bytes);
        // A slice still holds the block.
        assert_eq!(home.available(), 0);
        assert_eq!(&part[..], b"chunk");
        // Dropped on another thread, it comes home.
        std::thread::spawn(move || drop(part)).join().unwrap();
        assert_eq!(home.available(), 1);
        assert!(
            home.take(16384, 4096).is_none(),
            "too small a block is not handed out"
        );
        let again = home.take(4096, 4096).expect("the block is reused");
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!((again.len(), again.capacity()), (0, 8192));
    }

    #[test]
    fn a_full_recycler_frees_what_comes_back() {
        let home = Recycler::new(1);
        let a = AlignedBuf::new(4096, 4096).unwrap().freeze(&home).unwrap();
        let b = AlignedBuf::new(4096, 4096).unwrap().freeze(&home).unwrap();
        drop(a);
        drop(b);
        assert_eq!(home.available(), 1);
    }

    #[test]
    fn pool_buffers_are_not_frozen() {
        let pool = BufPool::new(1, 4096, 4096).unwrap();
        let b = pool.get().unwrap();
        assert!(b.freeze(&Recycler::new(1)).is_err());
    }
}
