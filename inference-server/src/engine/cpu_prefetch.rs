//! Software prefetch for the kernels that multiply two adjacent weight groups in one pass
//! ([`super::kquants_x8`]'s pairs, [`super::q8_0`]'s octets).
//!
//! Such a kernel reads two streams, block `b` of the first group and block `b` of the
//! second, and then the next two groups, which follow in memory. Prefetching a fixed
//! distance past each stream's own block misses half of what comes next: past the end of the
//! first group lies the second, already being read, and the start of the next pair's second
//! group is asked for by neither stream. So the prefetch here follows the order in which
//! the kernel will read: `steps` steps ahead of step `b`, the blocks it will multiply then,
//! in this pair or (past its end) the next. With groups of eight Q6_K blocks (2,048 columns)
//! and 12 KiB ahead of each stream, the second group of every pair was read from memory
//! unprefetched: one thread multiplied eight activation rows at 176–229 ns a block from
//! memory against 128–151 from its L2.
//!
//! The Q6_K pair kernel asks for its next pair's lines a quarter at a time ([`pair_ahead_at`],
//! [`part`]), between its chunks, not all 54 at the start of a step: issued together, the kernel's own
//! loads waited behind them (most likely for the core's queue of outstanding misses). One thread, eight activation rows, weights from memory: 142–148 ns an 8-row block
//! with every line asked for at the start, 120–125 spread over the step (111 and 115–117 from
//! its L2).

#![allow(unsafe_code)]

/// Asks for the blocks that a pair kernel multiplying `first[b]` and `second[b]` will
/// multiply `steps` steps later, into L2; `second` must follow `first` in memory, and the
/// next pair must follow `second`, as in a matrix stored group after group.
#[inline]
pub(super) fn pair_ahead<B>(first: &[B], second: &[B], b: usize, steps: usize) {
    let per_group = first.len();
    let at = b + steps;
    // Past the end of this pair: the next pair's groups, `2 × per_group` blocks further on.
    let skip = if at >= per_group { per_group } else { 0 };
    let bytes = std::mem::size_of::<B>();
    lines(first.as_ptr().wrapping_add(at + skip).cast(), bytes);
    lines(second.as_ptr().wrapping_add(at + skip).cast(), bytes);
}

/// Where [`pair_ahead`] prefetches from: the two blocks the kernel will multiply `steps`
/// steps after step `b`, for a kernel that prefetches them in parts ([`part`]) to spread its
/// prefetches over the step instead of issuing them all at its start.
#[inline]
pub(super) fn pair_ahead_at<B>(
    first: &[B],
    second: &[B],
    b: usize,
    steps: usize,
) -> [*const i8; 2] {
    let per_group = first.len();
    let at = b + steps;
    let skip = if at >= per_group { per_group } else { 0 };
    [
        first.as_ptr().wrapping_add(at + skip).cast(),
        second.as_ptr().wrapping_add(at + skip).cast(),
    ]
}

/// Part `part` of `parts` of the lines of the two blocks of `B` at `ahead`.
#[inline]
pub(super) fn part<B>(ahead: [*const i8; 2], part: usize, parts: usize) {
    let lines_per_block = std::mem::size_of::<B>().div_ceil(64);
    let (from, to) = (
        part * lines_per_block / parts,
        (part + 1) * lines_per_block / parts,
    );
    for at in ahead {
        lines(at.wrapping_add(64 * from), 64 * (to - from));
    }
}

/// Prefetches the `bytes` bytes from `at` into L2 (any address: a prefetch never faults).
#[inline]
pub(super) fn lines(at: *const i8, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is a hint: it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line)) };
    }
}

/// Steps of a pair kernel over two blocks of `B` that make up about `bytes` bytes.
pub(super) const fn steps_for<B>(bytes: usize) -> usize {
    let step = 2 * std::mem::size_of::<B>();
    if bytes > step { bytes / step } else { 1 }
}
