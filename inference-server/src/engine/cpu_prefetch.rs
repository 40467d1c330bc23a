//! Software prefetch for the kernels that multiply adjacent weight groups in one pass
//! ([`super::kquants_x8`]'s pairs, [`super::q8_0`]'s octets of two quads and sixteens of
//! four).
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
//! The Q6_K pair kernel asks for its next pair's lines a quarter at a time ([`ahead_at`],
//! [`part`]), between its chunks, not all 54 at the start of a step: issued together, the kernel's own
//! loads waited behind them (most likely for the core's queue of outstanding misses). One thread, eight activation rows, weights from memory: 142–148 ns an 8-row block
//! with every line asked for at the start, 120–125 spread over the step (111 and 115–117 from
//! its L2).

#![allow(unsafe_code)]

/// Asks for the blocks that a kernel multiplying block `b` of each of `streams` (adjacent
/// weight groups, each following the one before in memory) will multiply `steps` steps later,
/// into L2; past the end of these groups, the same blocks of the next `N` groups, which
/// follow them in memory, as in a matrix stored group after group.
#[inline]
pub(super) fn ahead<B, const N: usize>(streams: [&[B]; N], b: usize, steps: usize) {
    for at in ahead_at(streams, b, steps) {
        lines(at, std::mem::size_of::<B>());
    }
}

/// Where [`ahead`] prefetches from, for a kernel that prefetches in parts ([`part`]) to
/// spread its prefetches over the step instead of issuing them all at its start.
#[inline]
pub(super) fn ahead_at<B, const N: usize>(
    streams: [&[B]; N],
    b: usize,
    steps: usize,
) -> [*const i8; N] {
    let per_group = streams[0].len();
    let at = b + steps;
    // Past the end of these groups: the next `N` groups, `N × per_group` blocks further on.
    let skip = if at >= per_group {
        (N - 1) * per_group
    } else {
        0
    };
    streams.map(|group| group.as_ptr().wrapping_add(at + skip).cast())
}

/// Part `part` of `parts` of the lines of the blocks of `B` at `ahead`.
#[inline]
pub(super) fn part<B, const N: usize>(ahead: [*const i8; N], part: usize, parts: usize) {
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

/// Steps that make up about `bytes` bytes for a kernel reading a block of `B` from each of
/// `streams` groups a step.
pub(super) const fn steps_for<B>(bytes: usize, streams: usize) -> usize {
    let step = streams * std::mem::size_of::<B>();
    if bytes > step { bytes / step } else { 1 }
}
