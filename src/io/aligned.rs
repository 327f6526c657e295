//! A heap buffer aligned for O_DIRECT.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Page alignment satisfies every O_DIRECT memory-alignment rule we meet.
pub const BUF_ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(BUF_ALIGN), BUF_ALIGN)
            .expect("buffer size overflows a Layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    /// Like `zeroed`, but None instead of aborting when memory is short
    /// (for sizes that come from a file).
    pub fn try_zeroed(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1).next_multiple_of(BUF_ALIGN), BUF_ALIGN).ok()?;
        // SAFETY: layout has non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, len, layout })
    }

    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// True when `buf` can be handed to an O_DIRECT transfer as it is.
pub(crate) fn is_aligned(buf: &[u8], align: usize) -> bool {
    (buf.as_ptr() as usize) % align == 0 && buf.len() % align == 0
}

/// Memory alignment (address and length) asked of callers' buffers before
/// they go to O_DIRECT unchanged; anything else is bounced.
pub(crate) const MEM_ALIGN: usize = 512;

/// Reusable aligned buffers of one size (copy-up needs a cluster-sized
/// buffer per cluster in flight; allocating and zeroing 1 MiB each time
/// would cost more than the copy's bookkeeping).
pub struct BufPool {
    size: usize,
    /// Buffers kept for reuse; more are allocated when all are out.
    keep: usize,
    free: std::sync::Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    pub fn new(size: usize, keep: usize) -> BufPool {
        BufPool { size, keep, free: std::sync::Mutex::new(Vec::new()) }
    }
    pub fn get(&self) -> AlignedBuf {
        self.free.lock().unwrap().pop().unwrap_or_else(|| AlignedBuf::zeroed(self.size))
    }
    pub fn put(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap();
        if free.len() < self.keep && buf.len() == self.size {
            free.push(buf);
        }
    }
}
