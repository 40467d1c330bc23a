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
//! Here a key is read as it lies: eight keys' dot products with one query head gather in eight
//! registers and are summed across lanes at once (one `hadd` tree gives the eight scores).
//! The softmax runs eight scores at a time through [`super::cpu_exp::exp8`] (the prefill
//! kernel's [`super::cpu_prefill_attention::exponentials`]), online over
//! blocks of [`BLOCK`] keys as in the prefill kernel, and each head's weighted sum of values
//! stays in registers while it walks the block. The query is scaled by `1/√d` before the dot
//! products instead of each score after; results equal candle's up to float rounding.

#![allow(unsafe_code)]

use super::cpu_prefill_attention::refill;
use super::cpu_slice::KvRows;

/// Keys a block: the scores of a block (group × 64 floats) and its keys and values (16 KiB
/// each at head_dim 64) stay in L1 while the group's heads walk them.
pub(super) const BLOCK: usize = 64;

/// A worker thread's buffers, kept between tasks: the group's scaled query rows, one block's
/// scores, per head the running maximum and sum of exponentials, and one block's keys and
/// values converted to f32 (for an f16 pool).
#[derive(Default)]
pub(super) struct Scratch {
    pub(super) q: Vec<f32>,
    scores: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    block_keys: Vec<f32>,
    block_values: Vec<f32>,
}

/// Whether the kernel takes heads of dimension `head_dim` on this CPU (AVX2 and FMA, a head
/// dimension of 16, 32, 64 or 128).
pub(super) fn supported(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(head_dim, 16 | 32 | 64 | 128)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
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
/// untouched, where [`supported`] is false for `head_dim` or the slices do not have those
/// lengths (the caller checks both first).
#[must_use]
pub(super) fn attend(
    head_dim: usize,
    group: usize,
    keys: KvRows<'_>,
    values: KvRows<'_>,
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    let fits = keys.len() == values.len()
        && !keys.is_empty()
        && keys.len().is_multiple_of(head_dim)
        && scratch.q.len() == group * head_dim
        && out.len() == group * head_dim;
    if !fits || !supported(head_dim) {
        return false;
    }
    refill(&mut scratch.scores, group * BLOCK, 0.0);
    refill(&mut scratch.max, group, f32::NEG_INFINITY);
    refill(&mut scratch.sum, group, 0.0);
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked AVX2 and FMA; the lengths were checked above.
    unsafe {
        match head_dim {
            16 => avx2::attend::<2>(group, keys, values, scratch, out),
            32 => avx2::attend::<4>(group, keys, values, scratch, out),
            64 => avx2::attend::<8>(group, keys, values, scratch, out),
            _ => avx2::attend::<16>(group, keys, values, scratch, out),
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::cpu_prefill_attention::exponentials;
    use super::{BLOCK, KvRows, Scratch};

    /// Eight floats from `values[at..]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load(values: &[f32], at: usize) -> __m256 {
        let run = &values[at..at + 8];
        // SAFETY: `run` is eight floats, the width of the unaligned load.
        unsafe { _mm256_loadu_ps(run.as_ptr()) }
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

    /// The largest of the eight lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn largest(v: __m256) -> f32 {
        let half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
    }

    /// [`super::attend`] for heads of `8 * D8` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn attend<const D8: usize>(
        group: usize,
        keys: KvRows<'_>,
        values: KvRows<'_>,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let d = 8 * D8;
        let len = keys.len() / d;
        for k0 in (0..len).step_by(BLOCK) {
            let n = BLOCK.min(len - k0);
            let block_keys = keys.f32_run(k0 * d..(k0 + n) * d, &mut scratch.block_keys);
            let block_values = values.f32_run(k0 * d..(k0 + n) * d, &mut scratch.block_values);
            for h in 0..group {
                let query = &scratch.q[h * d..(h + 1) * d];
                let scores = &mut scratch.scores[h * BLOCK..(h + 1) * BLOCK];
                for t in (0..n).step_by(8) {
                    // Keys past the block's end repeat its last key; their lanes are masked.
                    // Eight keys at a time, a run of eight dimensions at a time: eight
                    // independent sums in registers.
                    let mut rows = [std::ptr::null::<f32>(); 8];
                    for (i, row) in rows.iter_mut().enumerate() {
                        *row = block_keys[(t + i).min(n - 1) * d..][..d].as_ptr();
                    }
                    let mut a = [_mm256_setzero_ps(); 8];
                    for j in 0..D8 {
                        let qj = load(query, 8 * j);
                        for (a, &row) in a.iter_mut().zip(&rows) {
                            // SAFETY: `row` starts a slice of `d = 8 D8` floats and `j < D8`.
                            let k = unsafe { _mm256_loadu_ps(row.add(8 * j)) };
                            *a = _mm256_fmadd_ps(qj, k, *a);
                        }
                    }
                    store(scores, t, sum_lanes(a));
                }
                // The online softmax: the block's maximum (lanes past `n` set to −∞), the
                // rescaling of what the head gathered so far, and the block's exponentials.
                let chunks = n.div_ceil(8);
                scores[n..chunks * 8].fill(f32::NEG_INFINITY);
                let mut top = _mm256_set1_ps(scratch.max[h]);
                for c in 0..chunks {
                    top = _mm256_max_ps(top, load(scores, 8 * c));
                }
                let top = largest(top);
                let correction = (scratch.max[h] - top).exp();
                scratch.max[h] = top;
                // This function runs only where AVX2 and FMA were detected.
                let block_sum = exponentials::<true>(&mut scores[..n], top);
                scratch.sum[h] = scratch.sum[h] * correction + block_sum;
                let correction = _mm256_set1_ps(correction);
                let mut acc: [__m256; D8] =
                    std::array::from_fn(|j| _mm256_mul_ps(load(out, h * d + 8 * j), correction));
                for (&p, row) in scores[..n].iter().zip(block_values.chunks_exact(d)) {
                    let p = _mm256_set1_ps(p);
                    for (j, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: `row` is `d = 8 D8` floats and `j < D8`.
                        let v = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * j)) };
                        *acc = _mm256_fmadd_ps(p, v, *acc);
                    }
                }
                for (j, &acc) in acc.iter().enumerate() {
                    store(out, h * d + 8 * j, acc);
                }
            }
        }
        for h in 0..group {
            let inverse = _mm256_set1_ps(1.0 / scratch.sum[h]);
            for j in 0..D8 {
                let v = _mm256_mul_ps(load(out, h * d + 8 * j), inverse);
                store(out, h * d + 8 * j, v);
            }
        }
    }
}
