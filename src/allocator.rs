//! The global allocator: mimalloc, asked the way the standard library asks `malloc`.
//!
//! The message path allocates some 150 blocks per message (the decoded JSON, frames, copies,
//! records). The `mimalloc` crate asks for every one with `mi_malloc_aligned`, which first
//! checks the alignment and whether the next free block happens to meet it. mimalloc's blocks
//! of more than 8 bytes are multiples of 16 bytes from a 16-byte-aligned start, and smaller ones
//! 8 bytes, so an alignment of at most 16 and at most the size is met by any block `mi_malloc`
//! returns: the test the standard library's own allocator makes before calling `malloc`. Other
//! layouts (larger alignments, a size below the alignment) still go to `mi_malloc_aligned`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every block of `mi_malloc` has when it is no smaller than the alignment
/// (mimalloc's `MI_MAX_ALIGN_SIZE`, `alignof(max_align_t)`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the global allocator.
pub struct Mimalloc;

/// Whether a block of `size` bytes from plain `mi_malloc` is aligned to `align`.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc, aligned as asked (see `plain`), and goes back to it.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's functions take any size and a power-of-two alignment.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from mimalloc (`GlobalAlloc`'s contract: from this allocator).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; a block moved by `mi_realloc` is a new `mi_malloc`
        // block, aligned as `plain` says for the new size.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 2 KiB and some larger, at every alignment up to 64: the block is aligned,
    /// holds what is written to it, and keeps it when it grows or shrinks.
    #[test]
    fn every_block_is_aligned_as_asked_and_keeps_its_bytes() {
        let sizes = (1..=2048).chain([4095, 4096, 10_000, 65_536, 1 << 20]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64] {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let block = Mimalloc.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                    block.write_bytes(0xA5, size);
                    let grown = Mimalloc.realloc(block, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {size}, align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xA5));
                    let layout = Layout::from_size_align(size * 3, align).unwrap();
                    let shrunk = Mimalloc.realloc(grown, layout, size.div_ceil(2));
                    assert_eq!(shrunk as usize % align, 0, "shrunk {size}, align {align}");
                    assert!((0..size.div_ceil(2)).all(|i| *shrunk.add(i) == 0xA5));
                    let layout = Layout::from_size_align(size.div_ceil(2), align).unwrap();
                    Mimalloc.dealloc(shrunk, layout);

                    let layout = Layout::from_size_align(size, align).unwrap();
                    let zeroed = Mimalloc.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size}, align {align}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0));
                    Mimalloc.dealloc(zeroed, layout);
                }
            }
        }
    }
}
