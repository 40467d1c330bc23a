//! The memory that regrouped quantized weights live in: on Linux, a private anonymous mapping
//! aligned to 2 MiB and marked for transparent huge pages; elsewhere, and for small matrices, a
//! `Vec`.
//!
//! Every decode step streams all the weights from memory. With 4 KiB pages that is one page
//! (and one TLB entry, which in a virtual machine costs a two-level walk to refill) every 4 KiB,
//! and the CPU's stream prefetchers stop at each page's end. 2 MiB pages remove both costs: on
//! the 2-core AMD EPYC VM (2026-12-06), single-stream Q4_K_M decode went from 24.4 / 27.9 /
//! 26.4 / 28.4 / 25.4 to 29.1 / 31.4 / 25.3 / 28.8 / 28.0 tokens/s (five interleaved pairs of
//! builds, nothing else changed; the VM's spread is wide). Most distributions ship `transparent_hugepage=madvise`, which honours the
//! `madvise(MADV_HUGEPAGE)` made here and does nothing for memory that did not ask; where huge
//! pages are off, the mapping behaves as ordinary memory.
//!
//! Only whole 2 MiB pages inside the buffer are huge: the tail is ordinary pages, so the
//! process's resident memory grows by nothing.

#![allow(unsafe_code)]

use std::ops::{Deref, DerefMut};

/// A fixed-length array of `T`, in huge pages where the platform gives them.
pub struct WeightBuffer<T: Copy> {
    storage: Storage<T>,
}

enum Storage<T: Copy> {
    Heap(Vec<T>),
    #[cfg(target_os = "linux")]
    Mapped(mapped::Mapping<T>),
}

impl<T: Copy> WeightBuffer<T> {
    /// `len` values, value `i` being `f(i)`.
    pub fn from_fn(len: usize, mut f: impl FnMut(usize) -> T) -> Self {
        #[cfg(target_os = "linux")]
        if let Some(mapping) = mapped::Mapping::from_fn(len, &mut f) {
            return Self {
                storage: Storage::Mapped(mapping),
            };
        }
        Self {
            storage: Storage::Heap((0..len).map(f).collect()),
        }
    }

    /// Whether the values lie in a mapping that asked for huge pages.
    #[cfg(test)]
    pub fn huge_pages_requested(&self) -> bool {
        match self.storage {
            Storage::Heap(_) => false,
            #[cfg(target_os = "linux")]
            Storage::Mapped(_) => true,
        }
    }
}

impl<T: Copy> Deref for WeightBuffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.storage {
            Storage::Heap(values) => values,
            #[cfg(target_os = "linux")]
            Storage::Mapped(mapping) => mapping.as_slice(),
        }
    }
}

impl<T: Copy> DerefMut for WeightBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Heap(values) => values,
            #[cfg(target_os = "linux")]
            Storage::Mapped(mapping) => mapping.as_mut_slice(),
        }
    }
}

#[cfg(target_os = "linux")]
mod mapped {
    use std::ptr::NonNull;

    /// The huge page size of x86-64 and of most arm64 kernels.
    const HUGE_PAGE: usize = 2 << 20;

    /// Below one huge page a mapping gains nothing.
    const MIN_BYTES: usize = HUGE_PAGE;

    /// `len` initialised values of `T` at `values`, inside a mapping of `map_len` bytes at
    /// `map` that this value owns (`T: Copy`, so unmapping drops nothing).
    pub(super) struct Mapping<T: Copy> {
        values: NonNull<T>,
        len: usize,
        map: NonNull<libc::c_void>,
        map_len: usize,
    }

    // SAFETY: the mapping is owned memory holding `T`s, like a `Vec<T>`.
    unsafe impl<T: Copy + Send> Send for Mapping<T> {}
    // SAFETY: shared access only reads, as for `&[T]`.
    unsafe impl<T: Copy + Sync> Sync for Mapping<T> {}

    impl<T: Copy> Mapping<T> {
        /// `None` when the array is smaller than a huge page or the kernel refuses the mapping;
        /// `f` is then not called.
        pub(super) fn from_fn(len: usize, f: &mut impl FnMut(usize) -> T) -> Option<Self> {
            let bytes = len.checked_mul(std::mem::size_of::<T>())?;
            if bytes < MIN_BYTES || std::mem::align_of::<T>() > HUGE_PAGE {
                return None;
            }
            let page = page_size();
            let map_len = bytes.checked_next_multiple_of(page)?;
            // Room to slide the start to a huge-page boundary; the slack is unmapped below.
            let reserve = map_len.checked_add(HUGE_PAGE)?;
            // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    reserve,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                return None;
            }
            let start = raw as usize;
            let aligned = start.next_multiple_of(HUGE_PAGE);
            let head = aligned - start;
            let tail = reserve - head - map_len;
            // SAFETY: both ranges lie inside the mapping made above, page-aligned (mmap's
            // start and `aligned` are page multiples, as are `map_len` and `reserve`), and
            // nothing refers to them.
            unsafe {
                if head > 0 {
                    libc::munmap(raw, head);
                }
                if tail > 0 {
                    libc::munmap((aligned + map_len) as *mut libc::c_void, tail);
                }
            }
            let map = NonNull::new(aligned as *mut libc::c_void)?;
            // A hint: where transparent huge pages are off it fails or does nothing, and the
            // memory stays ordinary pages.
            // SAFETY: the range is the mapping kept above.
            unsafe { libc::madvise(map.as_ptr(), map_len, libc::MADV_HUGEPAGE) };
            // Owned from here: should `f` panic, the mapping is unmapped with the values
            // written so far.
            let mut mapping = Self {
                values: map.cast::<T>(),
                len: 0,
                map,
                map_len,
            };
            for i in 0..len {
                let value = f(i);
                // SAFETY: `i < len` and the mapping holds `len` values, aligned (2 MiB is a
                // multiple of `T`'s alignment).
                unsafe { mapping.values.as_ptr().add(i).write(value) };
                mapping.len = i + 1;
            }
            Some(mapping)
        }

        pub(super) fn as_slice(&self) -> &[T] {
            // SAFETY: `len` values were written at construction.
            unsafe { std::slice::from_raw_parts(self.values.as_ptr(), self.len) }
        }

        pub(super) fn as_mut_slice(&mut self) -> &mut [T] {
            // SAFETY: as in `as_slice`, and `&mut self` is exclusive.
            unsafe { std::slice::from_raw_parts_mut(self.values.as_ptr(), self.len) }
        }
    }

    impl<T: Copy> Drop for Mapping<T> {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `from_fn`, no longer referred to.
            unsafe { libc::munmap(self.map.as_ptr(), self.map_len) };
        }
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_hold_their_values_on_the_heap() {
        let mut buffer = WeightBuffer::from_fn(1000, |i| i as u32 * 3);
        assert!(!buffer.huge_pages_requested());
        assert_eq!(buffer.len(), 1000);
        assert!(buffer.iter().enumerate().all(|(i, &v)| v == i as u32 * 3));
        buffer[7] = 1;
        assert_eq!(buffer[7], 1);
    }

    #[test]
    fn large_arrays_hold_their_values_in_an_aligned_mapping() {
        // 3 MiB and a bit: one whole huge page and an ordinary tail.
        let len = (3 << 20) / 8 + 5;
        let mut buffer = WeightBuffer::from_fn(len, |i| [i as u32, !(i as u32)]);
        assert_eq!(buffer.len(), len);
        assert!(
            buffer
                .iter()
                .enumerate()
                .all(|(i, &v)| v == [i as u32, !(i as u32)])
        );
        buffer[len - 1] = [0, 0];
        assert_eq!(buffer[len - 1], [0, 0]);
        assert_eq!(buffer[len - 2], [len as u32 - 2, !(len as u32 - 2)]);
        if cfg!(target_os = "linux") {
            assert!(buffer.huge_pages_requested());
            assert_eq!(buffer.as_ptr() as usize % (2 << 20), 0);
        }
        drop(buffer);
        // A panicking `f` leaves no half-built buffer behind.
        let failed = std::panic::catch_unwind(|| {
            WeightBuffer::from_fn(len, |i| {
                assert!(i < 1000, "value {i}");
                i as u64
            })
        });
        assert!(failed.is_err());
        // The mapping is gone and a new one works.
        let again = WeightBuffer::from_fn(len, |_| 7u64);
        assert_eq!(again.iter().copied().sum::<u64>(), 7 * len as u64);
    }
}
