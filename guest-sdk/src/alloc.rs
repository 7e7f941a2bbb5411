//! The guest's memory allocator: small blocks in power-of-two size classes,
//! each class a free list over slabs taken from the system allocator.
//!
//! A processor allocates many small values per event (payload strings, SQL
//! parameters, JSON buffers) and frees them when the event ends. The system
//! allocator of `wasm32-wasip2` (dlmalloc) does general bookkeeping on every
//! call (boundary tags, bins, coalescing): about 4% of the instructions of a
//! payments run. Here a small allocation pops a free list or bumps a pointer,
//! and a free pushes the list: a few instructions each. Blocks above
//! [`MAX_SMALL`] bytes go to the system allocator as before.
//!
//! Memory of a class is kept for that class: what the instance holds is the
//! peak of each class, and an instance lives for one epoch of events.
//! Installed by the `allocator` feature (on by default) as the global
//! allocator of a wasm guest; single-threaded, as guests are.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The smallest class: room for the free list's link.
const MIN_SHIFT: u32 = 3;
/// The largest class.
const MAX_SHIFT: u32 = 12;
/// Bytes of the largest block served from a class.
pub const MAX_SMALL: usize = 1 << MAX_SHIFT;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Bytes taken from the system allocator at a time.
const SLAB: usize = 64 << 10;

/// The allocator; see the module documentation.
pub struct Allocator {
    state: UnsafeCell<State>,
}

struct State {
    /// The first free block of each class; a free block's first word links
    /// to the next.
    free: [*mut u8; CLASSES],
    /// The unused rest of the current slab.
    next: *mut u8,
    end: *mut u8,
}

// SAFETY: wasm guests have one thread (rewind compiles no wasm threads), and
// the native tests use an allocator from one thread at a time.
unsafe impl Sync for Allocator {}

impl Allocator {
    /// An allocator holding no memory yet.
    pub const fn new() -> Self {
        Allocator {
            state: UnsafeCell::new(State {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
        }
    }
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator::new()
    }
}

/// The class of a layout, if it is small: blocks of a class are as large as
/// the class and aligned to it, so a layout fits when both its size and its
/// alignment do.
fn class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align());
    if size > MAX_SMALL {
        return None;
    }
    let shift = size.next_power_of_two().trailing_zeros().max(MIN_SHIFT);
    Some((shift - MIN_SHIFT) as usize)
}

fn class_size(class: usize) -> usize {
    1 << (class as u32 + MIN_SHIFT)
}

unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class(layout) else {
            // SAFETY: forwarded as given.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: single-threaded (see `Sync`), and no reference to the
        // state outlives this call.
        let state = unsafe { &mut *self.state.get() };
        let head = state.free[class];
        if !head.is_null() {
            // SAFETY: a free block of this class holds the link to the next.
            state.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = class_size(class);
        let mut start = state.next.wrapping_add(state.next.align_offset(size));
        if state.next.is_null() || start.addr() + size > state.end.addr() {
            // A new slab; the rest of the old one is left unused (less
            // than a block of this class).
            // SAFETY: SLAB and MAX_SMALL are a valid size and alignment.
            let slab = unsafe { System.alloc(Layout::from_size_align_unchecked(SLAB, MAX_SMALL)) };
            if slab.is_null() {
                return ptr::null_mut();
            }
            start = slab;
            state.end = slab.wrapping_add(SLAB);
        }
        state.next = start.wrapping_add(size);
        start
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(class) = class(layout) else {
            // SAFETY: a large block came from the system allocator.
            return unsafe { System.dealloc(block, layout) };
        };
        // SAFETY: as in `alloc`; the block is at least a pointer large and
        // aligned (the smallest class), and is the caller's to give back.
        let state = unsafe { &mut *self.state.get() };
        unsafe { block.cast::<*mut u8>().write(state.free[class]) };
        state.free[class] = block;
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller promises a valid layout for `new_size`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new_layout)) {
            // Still in its class: the block already has the room.
            (Some(old), Some(new)) if old == new => block,
            // SAFETY: both are the system allocator's.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            _ => {
                // SAFETY: as the trait's default: a new block, the old
                // bytes copied, the old block freed.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn layouts_fall_in_the_smallest_class_that_holds_size_and_alignment() {
        assert_eq!(class(layout(0, 1)), Some(0));
        assert_eq!(class(layout(8, 8)), Some(0));
        assert_eq!(class(layout(9, 1)), Some(1));
        assert_eq!(class(layout(4, 64)), Some(3));
        assert_eq!(class(layout(MAX_SMALL, 8)), Some(CLASSES - 1));
        assert_eq!(class(layout(MAX_SMALL + 1, 8)), None);
        assert_eq!(class(layout(8, 2 * MAX_SMALL)), None);
    }

    #[test]
    fn blocks_are_aligned_distinct_and_reused_after_free() {
        let a = Allocator::new();
        let mut blocks = Vec::new();
        for (i, &(size, align)) in [(1, 1), (24, 8), (100, 16), (3000, 64), (4096, 4096)]
            .iter()
            .cycle()
            .take(200)
            .enumerate()
        {
            let l = layout(size, align);
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            assert_eq!(p.addr() % align, 0, "{size}/{align}");
            unsafe { p.write_bytes(i as u8, size) };
            blocks.push((p, l, i as u8));
        }
        // Nothing overlaps: every block still holds what was written into it.
        for &(p, l, byte) in &blocks {
            assert!((0..l.size()).all(|k| unsafe { p.add(k).read() } == byte));
        }
        let (p, l, _) = blocks.pop().unwrap();
        unsafe { a.dealloc(p, l) };
        assert_eq!(
            unsafe { a.alloc(l) },
            p,
            "a freed block is handed out again"
        );
        for (p, l, _) in blocks {
            unsafe { a.dealloc(p, l) };
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_into_the_system_allocator() {
        let a = Allocator::new();
        let mut l = layout(5, 1);
        let mut p = unsafe { a.alloc(l) };
        unsafe { p.copy_from_nonoverlapping(b"hello".as_ptr(), 5) };
        for size in [7, 8, 9, 100, 4096, 5000, 100_000, 300, 5] {
            p = unsafe { a.realloc(p, l, size) };
            assert!(!p.is_null());
            l = layout(size, 1);
            let kept = unsafe { std::slice::from_raw_parts(p, 5) };
            assert_eq!(kept, b"hello", "after growing or shrinking to {size}");
        }
        unsafe { a.dealloc(p, l) };
    }

    #[test]
    fn large_blocks_are_the_system_allocators() {
        let a = Allocator::new();
        let l = layout(1 << 20, 8);
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        unsafe { p.write_bytes(7, l.size()) };
        unsafe { a.dealloc(p, l) };
    }
}
