//! The AVX2 kernel of decode attention: the query heads of one token that share a key/value
//! head, against the sequence's keys and values in place in the pool.
//!
//! Decode attention used to run the prefill kernel ([`super::cpu_prefill_attention`]) for its
//! one token: it transposes every 64-key block so that many query rows can read it from L1,
//! and takes its exponentials one at a time through the C library. With one token only the
//! group's query heads (four in Llama 3) share each transposed block. On the 2-core AMD EPYC
//! one layer-by-layer pass of 8 sequences over 16 layers of the Llama-3.2-1B shape took
//! 10.4–11.6 ms through it at 192 tokens of context and 43–48 ms at 1000; here 6.6–7.1 and
//! 28–30 ms (both threads, the keys and values read from memory as in a decode step). What is
//! left is mostly reading the f32 keys and values: at 1000 tokens that is 525 MB a step.
//!
//! Each block of keys and values is read once for up to four of the group's query heads at a
//! time. The dot products of two keys with four heads (or four keys with two heads, eight
//! with one) gather in eight registers, and one `hadd` tree sums them into eight scores, laid
//! out key by key. In the weighted sum each run of eight dimensions of a value row is loaded
//! once and added into every head's sum. An f16 pool is widened with F16C as each run of
//! eight is loaded, so it is read from memory at half the bytes and never copied. The
//! softmax runs eight scores at a time through [`super::cpu_exp::exp8`], online over blocks
//! of [`BLOCK`] keys as in the prefill kernel. The query is scaled by `1/√d` before the dot
//! products instead of each score after; results equal candle's up to float rounding.
//!
//! The kernel used to walk a block once per head (each head's eight keys at a time), to
//! convert an f16 block into an f32 buffer first, and to read the value rows from memory in
//! strides (a run of columns at a time); now the scoring pass prefetches each key's value row
//! for the weighted sum. On the 2-core AMD EPYC, 8 sequences × 1,024 tokens over 16 layers
//! (Llama-3.2-1B shape, both threads, interleaved runs) took 27–37 ms that way and 14–16 ms
//! this way with an f16 pool (29–34 against 21–24 ms with an f32 one); 8 × 192 tokens took
//! 5.9–7.2 against 3.5–3.8 ms.

#![allow(unsafe_code)]

use super::cpu_prefill_attention::refill;
use super::cpu_slice::KvRows;

/// Keys a block: a block's scores (up to four heads × 64 floats) stay in L1 between the dot
/// products and the weighted sum of values.
pub(super) const BLOCK: usize = 64;

/// A worker thread's buffers, kept between tasks: the group's scaled query rows, one block's
/// scores for up to four heads, and per head the running maximum and sum of exponentials.
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) q: Vec<f32>,
    scores: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// Whether the kernel takes heads of dimension `head_dim` on this CPU (AVX2, FMA and F16C, a
/// head dimension of 16, 32, 64 or 128).
pub(super) fn supported(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(head_dim, 16 | 32 | 64 | 128)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// Attention of `scratch.q` (`group` query rows of `head_dim` values, already scaled by
/// `1/√head_dim`) over `keys` and `values` (the sequence's rows for their key/value head,
/// `len × head_dim` each), written to `out` (`group × head_dim`). Returns false, with `out`
/// untouched, where [`supported`] is false for `head_dim`, or the slices do not have those
/// lengths or differ in element type (the caller checks all of these first).
#[must_use]
pub(super) fn attend(
    head_dim: usize,
    group: usize,
    keys: KvRows<'_>,
    values: KvRows<'_>,
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    let same_type = matches!(
        (keys, values),
        (KvRows::F32(_), KvRows::F32(_)) | (KvRows::F16(_), KvRows::F16(_))
    );
    let fits = same_type
        && keys.len() == values.len()
        && !keys.is_empty()
        && keys.len().is_multiple_of(head_dim)
        && scratch.q.len() == group * head_dim
        && out.len() == group * head_dim;
    if !fits || !supported(head_dim) {
        return false;
    }
    // Up to four heads' scores a key (see `Tile::attend`).
    refill(&mut scratch.scores, 4 * BLOCK, 0.0);
    refill(&mut scratch.max, group, f32::NEG_INFINITY);
    refill(&mut scratch.sum, group, 0.0);
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked AVX2, FMA and F16C; the lengths were checked above.
    unsafe {
        match (keys, values) {
            (KvRows::F32(keys), KvRows::F32(values)) => {
                avx2::attend_rows(head_dim, group, keys, values, scratch, out);
            }
            (KvRows::F16(keys), KvRows::F16(values)) => {
                avx2::attend_rows(head_dim, group, keys, values, scratch, out);
            }
            // Ruled out by `same_type` above.
            _ => return false,
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::cpu_exp::exp8;
    use super::{BLOCK, Scratch};

    /// A key/value pool element: f32, or f16 widened to f32 as it is loaded.
    pub(super) trait Element: Copy {
        /// Whether the element is f16.
        const HALF: bool;
    }

    impl Element for f32 {
        const HALF: bool = false;
    }

    impl Element for f16 {
        const HALF: bool = true;
    }

    /// Eight elements from `row[at..]`, as f32 (the query, scores and output are f32 rows too).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_row<T: Element>(row: &[T], at: usize) -> __m256 {
        let run = &row[at..at + 8];
        // SAFETY: `run` is eight elements: 16 bytes of f16 or 32 of f32, the widths of the
        // unaligned loads.
        unsafe {
            if T::HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(run.as_ptr().cast()))
            } else {
                _mm256_loadu_ps(run.as_ptr().cast())
            }
        }
    }

    /// Asks the CPU to bring every cache line of `row` into L1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch<T>(row: &[T]) {
        let start = row.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(row)).step_by(64) {
            // A prefetch is a hint: it never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset));
        }
    }

    /// Stores eight floats at `values[at..]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store(values: &mut [f32], at: usize, v: __m256) {
        let run = &mut values[at..at + 8];
        // SAFETY: `run` is eight floats, the width of the unaligned store.
        unsafe { _mm256_storeu_ps(run.as_mut_ptr(), v) }
    }

    /// Lane `i` of the result is the sum of the eight lanes of `a[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(a: [__m256; 8]) -> __m256 {
        let t = [
            _mm256_hadd_ps(a[0], a[1]),
            _mm256_hadd_ps(a[2], a[3]),
            _mm256_hadd_ps(a[4], a[5]),
            _mm256_hadd_ps(a[6], a[7]),
        ];
        // u[0]: a0..a3's sums of lanes 0-3, then of lanes 4-7; u[1] the same for a4..a7.
        let u = [_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3])];
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u[0], u[1]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[1]),
        )
    }

    /// [`super::attend`] on the pool's elements in place.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn attend_rows<T: Element>(
        head_dim: usize,
        group: usize,
        keys: &[T],
        values: &[T],
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        match head_dim {
            16 => attend::<2, T>(group, keys, values, scratch, out),
            32 => attend::<4, T>(group, keys, values, scratch, out),
            64 => attend::<8, T>(group, keys, values, scratch, out),
            _ => attend::<16, T>(group, keys, values, scratch, out),
        }
    }

    /// [`super::attend`] for heads of `8 * D8` values: each block of keys and values is read
    /// once for up to four of the group's heads at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn attend<const D8: usize, T: Element>(
        group: usize,
        keys: &[T],
        values: &[T],
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let d = 8 * D8;
        let len = keys.len() / d;
        for k0 in (0..len).step_by(BLOCK) {
            let n = BLOCK.min(len - k0);
            let block = Block {
                keys: &keys[k0 * d..(k0 + n) * d],
                values: &values[k0 * d..(k0 + n) * d],
                n,
            };
            let mut first = 0;
            while first < group {
                let tile = Tile {
                    first,
                    q: &scratch.q,
                    scores: &mut scratch.scores,
                    max: &mut scratch.max,
                    sum: &mut scratch.sum,
                    out: &mut *out,
                };
                // Heads four at a time: 2 keys × 4 heads, 4 × 2 or 8 × 1 dot products fill
                // the eight score registers. Three heads take the four-head layout.
                first += match group - first {
                    1 => tile.attend::<D8, 1, 1, T>(&block),
                    2 => tile.attend::<D8, 2, 2, T>(&block),
                    3 => tile.attend::<D8, 3, 4, T>(&block),
                    _ => tile.attend::<D8, 4, 4, T>(&block),
                };
            }
        }
        for h in 0..group {
            let inverse = _mm256_set1_ps(1.0 / scratch.sum[h]);
            for j in 0..D8 {
                let v = _mm256_mul_ps(load_row(out, h * d + 8 * j), inverse);
                store(out, h * d + 8 * j, v);
            }
        }
    }

    /// One block of a sequence's keys and values for one key/value head, in the pool's
    /// element type.
    struct Block<'a, T> {
        keys: &'a [T],
        values: &'a [T],
        /// Keys in the block (at most [`BLOCK`]).
        n: usize,
    }

    /// The group's heads `first..` and their running state.
    struct Tile<'a> {
        first: usize,
        q: &'a [f32],
        scores: &'a mut [f32],
        max: &'a mut [f32],
        sum: &'a mut [f32],
        out: &'a mut [f32],
    }

    impl Tile<'_> {
        /// Heads `first .. first + HEADS` over one block, laid out `STRIDE` scores a key
        /// (`STRIDE` is 1, 2 or 4, at least `HEADS`; `8 / STRIDE` keys fill a register of
        /// scores). Returns `HEADS`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn attend<const D8: usize, const HEADS: usize, const STRIDE: usize, T: Element>(
            self,
            block: &Block<'_, T>,
        ) -> usize {
            let d = 8 * D8;
            let keys_per_register = 8 / STRIDE;
            let n = block.n;
            let q = &self.q[self.first * d..(self.first + HEADS) * d];
            // Scores key-major: score (key t, head h) at `t * STRIDE + h`; the lanes of heads
            // past `HEADS` stay 0.
            let scores = &mut self.scores[..BLOCK * STRIDE];
            for t in (0..n).step_by(keys_per_register) {
                let mut rows: [&[T]; 8] = [&[]; 8];
                for (i, row) in rows.iter_mut().take(keys_per_register).enumerate() {
                    // Keys past the block's end repeat its last key; their lanes are masked.
                    *row = &block.keys[(t + i).min(n - 1) * d..][..d];
                }
                // The weighted sum below walks the block's value rows once per run of
                // columns: fetched now, they are read from L1 there, not from memory in
                // strides.
                for i in t..(t + keys_per_register).min(n) {
                    prefetch(&block.values[i * d..(i + 1) * d]);
                }
                let mut a = [_mm256_setzero_ps(); 8];
                for j in 0..D8 {
                    let qj: [__m256; HEADS] = std::array::from_fn(|h| load_row(q, h * d + 8 * j));
                    for (k, &row) in rows.iter().take(keys_per_register).enumerate() {
                        let key = load_row(row, 8 * j);
                        for (h, &qh) in qj.iter().enumerate() {
                            a[k * STRIDE + h] = _mm256_fmadd_ps(qh, key, a[k * STRIDE + h]);
                        }
                    }
                }
                store(scores, t * STRIDE, sum_lanes(a));
            }
            // The online softmax, per head: the block's maximum (keys past `n` set to −∞),
            // the rescaling of what each head gathered so far, the block's exponentials.
            let registers = (n * STRIDE).div_ceil(8);
            scores[n * STRIDE..registers * 8].fill(f32::NEG_INFINITY);
            let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
            for r in 0..registers {
                top = _mm256_max_ps(top, load_row(scores, 8 * r));
            }
            let mut lanes = [0f32; 8];
            store(&mut lanes, 0, top);
            let mut correction = [0f32; HEADS];
            let mut shift = [0f32; 8];
            for (h, correction) in correction.iter_mut().enumerate() {
                let head = self.first + h;
                let block_top = lanes
                    .iter()
                    .skip(h)
                    .step_by(STRIDE)
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let top = self.max[head].max(block_top);
                *correction = (self.max[head] - top).exp();
                self.max[head] = top;
                for lane in shift.iter_mut().skip(h).step_by(STRIDE) {
                    *lane = top;
                }
            }
            let shift = load_row(&shift, 0);
            let mut total = _mm256_setzero_ps();
            for r in 0..registers {
                let p = exp8(_mm256_sub_ps(load_row(scores, 8 * r), shift));
                total = _mm256_add_ps(total, p);
                store(scores, 8 * r, p);
            }
            store(&mut lanes, 0, total);
            for (h, &c) in correction.iter().enumerate() {
                let block_sum: f32 = lanes.iter().skip(h).step_by(STRIDE).sum();
                let head = self.first + h;
                self.sum[head] = self.sum[head] * c + block_sum;
            }
            // The weighted sums of values: `width` runs of eight dimensions for every head at
            // once, each value row's run read once for all of them.
            let width = keys_per_register.min(D8);
            let scores = &scores[..n * STRIDE];
            for j0 in (0..D8).step_by(width) {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (h, &c) in correction.iter().enumerate() {
                    let c = _mm256_set1_ps(c);
                    for w in 0..width {
                        let at = (self.first + h) * d + 8 * (j0 + w);
                        acc[h * width + w] = _mm256_mul_ps(load_row(self.out, at), c);
                    }
                }
                for (p, row) in scores
                    .chunks_exact(STRIDE)
                    .zip(block.values.chunks_exact(d))
                {
                    let v: [__m256; 8] = std::array::from_fn(|w| {
                        if w < width {
                            load_row(row, 8 * (j0 + w))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    for (h, &p) in p.iter().take(HEADS).enumerate() {
                        let p = _mm256_set1_ps(p);
                        for w in 0..width {
                            acc[h * width + w] = _mm256_fmadd_ps(p, v[w], acc[h * width + w]);
                        }
                    }
                }
                for h in 0..HEADS {
                    for w in 0..width {
                        let at = (self.first + h) * d + 8 * (j0 + w);
                        store(self.out, at, acc[h * width + w]);
                    }
                }
            }
            HEADS
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    #[test]
    fn refuses_what_it_does_not_take_and_leaves_the_output_untouched() {
        let (d, group) = (64, 4);
        let keys = vec![0.25f32; 3 * d];
        let values = vec![0.5f32; 3 * d];
        let half_values = vec![f16::from_f32(0.5); 3 * d];
        let mut scratch = Scratch {
            q: vec![0.1; group * d],
            ..Scratch::default()
        };
        let mut out = vec![7.0f32; group * d];
        // Keys and values of different element types, of different lengths, and a head
        // dimension the kernel has no form for.
        let refused = [
            (d, KvRows::F32(&keys), KvRows::F16(&half_values)),
            (d, KvRows::F32(&keys), KvRows::F32(&values[..2 * d])),
            (48, KvRows::F32(&keys), KvRows::F32(&values)),
        ];
        for (head_dim, k, v) in refused {
            assert!(!attend(head_dim, group, k, v, &mut scratch, &mut out));
            assert!(out.iter().all(|&x| x == 7.0), "head_dim {head_dim}");
        }
        // Every value row is 0.5, so every head's weighted sum is 0.5 whatever its scores.
        if supported(d) {
            for v in [KvRows::F32(&values), KvRows::F16(&half_values)] {
                let k = match v {
                    KvRows::F32(_) => KvRows::F32(&keys),
                    KvRows::F16(_) => KvRows::F16(&half_values),
                };
                assert!(attend(d, group, k, v, &mut scratch, &mut out));
                assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-6), "{out:?}");
            }
        }
    }
}
