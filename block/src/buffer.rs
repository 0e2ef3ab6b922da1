//! Aligned I/O buffers from a per-thread pool, so that the request path does not allocate.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Every buffer is aligned to this, enough for `O_DIRECT` on any device.
pub const BUFFER_ALIGN: usize = 4096;

/// Buffers up to this size are kept for reuse; larger ones go back to the allocator.
const MAX_POOLED_CAPACITY: usize = 4 << 20;

/// How many free buffers of one size class a thread keeps.
const MAX_POOLED_PER_CLASS: usize = 256;

/// Size classes: powers of two from `BUFFER_ALIGN` to `MAX_POOLED_CAPACITY`.
const CLASSES: usize =
    (MAX_POOLED_CAPACITY.trailing_zeros() - BUFFER_ALIGN.trailing_zeros()) as usize + 1;

/// A byte buffer aligned to [`BUFFER_ALIGN`], whose memory comes from (and returns to) a pool
/// of the thread that drops it. Its bytes are always initialised; a new buffer's contents
/// are unspecified (earlier data of the same thread) unless made with [`IoBuffer::zeroed`].
///
/// ```
/// use aiocoro_block::IoBuffer;
///
/// let mut buffer = IoBuffer::new(512);
/// buffer.fill(7);
/// assert_eq!(buffer.len(), 512);
/// assert_eq!(buffer.as_ptr() as usize % aiocoro_block::BUFFER_ALIGN, 0);
/// ```
pub struct IoBuffer {
    /// Invariant: points at `capacity` initialised bytes allocated with
    /// `Layout::from_size_align(capacity, BUFFER_ALIGN)`, owned by this buffer alone;
    /// `len <= capacity`.
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer owns its memory outright (no sharing, no thread-bound state); a buffer
// dropped on another thread goes to that thread's pool or to the allocator.
unsafe impl Send for IoBuffer {}
// SAFETY: `&IoBuffer` only reads the bytes.
unsafe impl Sync for IoBuffer {}

thread_local! {
    /// Free buffers of this thread, by size class.
    static POOL: RefCell<[Vec<IoBuffer>; CLASSES]> = RefCell::new(std::array::from_fn(|_| Vec::new()));
}

impl IoBuffer {
    /// A buffer of `len` bytes with unspecified (but initialised) contents.
    ///
    /// # Panics
    ///
    /// If `len` is too large for any allocation (more than `isize::MAX` bytes once rounded up
    /// to the alignment); aborts if the memory cannot be had.
    pub fn new(len: usize) -> IoBuffer {
        let capacity = capacity_for(len);
        let pooled = class_of(capacity)
            .and_then(|class| POOL.try_with(|pool| pool.borrow_mut()[class].pop()).ok().flatten());
        let mut buffer = pooled.unwrap_or_else(|| IoBuffer::allocate(capacity));
        buffer.len = len;
        buffer
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuffer {
        let mut buffer = IoBuffer::new(len);
        buffer.fill(0);
        buffer
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> IoBuffer {
        let mut buffer = IoBuffer::new(bytes.len());
        buffer.copy_from_slice(bytes);
        buffer
    }

    fn allocate(capacity: usize) -> IoBuffer {
        let layout = Layout::from_size_align(capacity, BUFFER_ALIGN).expect(
            "aiocoro-block: capacity_for hands out only capacities that make a valid layout",
        );
        // SAFETY: `capacity_for` never returns 0, so the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        IoBuffer { ptr, len: capacity, capacity }
    }

    /// Shortens the buffer to `len` bytes (no effect if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// The capacity a buffer of `len` bytes gets: a size class, or `len` rounded up to the
/// alignment beyond the largest class.
fn capacity_for(len: usize) -> usize {
    let len = len.max(1);
    if len <= MAX_POOLED_CAPACITY {
        len.next_power_of_two().max(BUFFER_ALIGN)
    } else {
        // Checked: near `usize::MAX` the rounding would wrap to a small capacity (0 even, a
        // zero-sized allocation) under a buffer whose `len` is huge.
        len.checked_next_multiple_of(BUFFER_ALIGN)
            .filter(|&capacity| Layout::from_size_align(capacity, BUFFER_ALIGN).is_ok())
            .unwrap_or_else(|| panic!("aiocoro-block: an IoBuffer of {len} bytes is too large"))
    }
}

/// The pool class of a capacity, if it is pooled.
fn class_of(capacity: usize) -> Option<usize> {
    let pooled =
        capacity.is_power_of_two() && (BUFFER_ALIGN..=MAX_POOLED_CAPACITY).contains(&capacity);
    pooled.then(|| (capacity.trailing_zeros() - BUFFER_ALIGN.trailing_zeros()) as usize)
}

impl Deref for IoBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `capacity >= len` initialised bytes this buffer owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        if let Some(class) = class_of(self.capacity) {
            let (ptr, capacity) = (self.ptr, self.capacity);
            let pooled = POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                let room = pool[class].len() < MAX_POOLED_PER_CLASS;
                if room {
                    // The memory changes owner: this buffer frees nothing below.
                    pool[class].push(IoBuffer { ptr, len: capacity, capacity });
                }
                room
            });
            if pooled == Ok(true) {
                return;
            }
            // The class is full, or the thread is going away: free the memory.
        }
        let layout = Layout::from_size_align(self.capacity, BUFFER_ALIGN).expect(
            "aiocoro-block: an IoBuffer's capacity made a valid layout when it was allocated",
        );
        // SAFETY: `ptr` was allocated with this layout (the invariant) and nothing else owns
        // it: it went to no pool (that path returned above).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuffer")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Copies `bytes` into `bufs` in order, as many as both hold (the scatter half of a bounce
/// buffer).
pub(crate) fn scatter(bytes: &[u8], bufs: &mut [std::io::IoSliceMut<'_>]) {
    let mut rest = bytes;
    for buf in bufs.iter_mut() {
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// Copies `bufs` in order into `out`, as many bytes as both hold (the gather half of a
/// bounce buffer).
pub(crate) fn gather_into(bufs: &[std::io::IoSlice<'_>], out: &mut [u8]) {
    let mut rest = out;
    for buf in bufs {
        let n = buf.len().min(rest.len());
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&buf[..n]);
        rest = tail;
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn gather_into_and_scatter_copy_in_order_as_much_as_fits() {
        let (a, b) = ([1u8, 2, 3], [4u8, 5]);
        let mut out = [0u8; 4];
        gather_into(&[std::io::IoSlice::new(&a), std::io::IoSlice::new(&b)], &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        let (mut x, mut y) = ([0u8; 2], [0u8; 3]);
        scatter(&out, &mut [std::io::IoSliceMut::new(&mut x), std::io::IoSliceMut::new(&mut y)]);
        assert_eq!((x, y), ([1, 2], [3, 4, 0]));
    }
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let first = IoBuffer::new(4096);
        let address = first.as_ptr();
        assert_eq!(address as usize % BUFFER_ALIGN, 0);
        drop(first);
        let second = IoBuffer::new(3000);
        assert_eq!(second.as_ptr(), address, "the freed buffer of the same class comes back");
        assert_eq!(second.len(), 3000);
    }

    #[test]
    fn sizes_map_to_classes() {
        assert_eq!(capacity_for(0), BUFFER_ALIGN);
        assert_eq!(capacity_for(4097), 8192);
        assert_eq!(class_of(BUFFER_ALIGN), Some(0));
        assert_eq!(class_of(MAX_POOLED_CAPACITY), Some(CLASSES - 1));
        let big = capacity_for(MAX_POOLED_CAPACITY + 1);
        assert_eq!(big, MAX_POOLED_CAPACITY + BUFFER_ALIGN);
        assert_eq!(class_of(big), None);
        let huge = IoBuffer::zeroed(MAX_POOLED_CAPACITY + 1);
        assert!(huge.iter().all(|&b| b == 0));
    }

    /// Rounding the capacity up must not wrap (in release builds it used to give capacity 0
    /// under a `len` of `usize::MAX`: a zero-sized allocation, and a slice over all memory).
    #[test]
    #[should_panic(expected = "is too large")]
    fn a_buffer_too_large_for_memory_is_a_clear_panic() {
        let _ = IoBuffer::new(usize::MAX);
    }

    #[test]
    #[should_panic(expected = "is too large")]
    fn a_buffer_larger_than_any_layout_is_a_clear_panic() {
        let _ = IoBuffer::new(isize::MAX as usize);
    }

    #[test]
    fn a_buffer_dropped_on_another_thread_is_fine() {
        let buffer = IoBuffer::copy_from(b"hello");
        let back = std::thread::spawn(move || {
            assert_eq!(&buffer[..], b"hello");
            drop(buffer);
            IoBuffer::new(5).len()
        });
        assert_eq!(back.join().unwrap(), 5);
    }
}
