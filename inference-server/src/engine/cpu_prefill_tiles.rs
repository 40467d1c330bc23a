//! The AVX2/FMA prefill attention for head dimensions that are a multiple of 16 (64 and 128,
//! every Llama 3.x shape): the scores of a key block, and the weighted sum of its values, as
//! small matrix products of six query rows at a time.
//!
//! The one-row kernel ([`super::cpu_prefill_attention`]) loaded a transposed key column for
//! every multiply-add, and a value row for every one of the weighted sum: the load ports, not
//! the FMA units, set its pace (about 37 % of FMA peak in a 2,048-token prefill). Here six
//! query rows share each load: sixteen keys' (or value dimensions') worth of two registers
//! meets six broadcast query (or probability) values in twelve accumulators, the layout of
//! the classic 6 × 16 AVX2 matrix kernel, for 8 loads per 12 multiply-adds instead of 9 per 8.
//!
//! Rows are token-major (the group's query heads of one token side by side), so a tile's rows
//! mostly share one position. Where they do not (the block on the diagonal), each row's keys
//! past its position are masked to a probability of 0, and rows that see nothing of a block
//! keep their running sums untouched.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::cpu_lanes::{lane_max, lane_sum};
use super::cpu_prefill_attention::{KEYS, Scratch, Shape, Work, fma, refill};
use super::cpu_slice::KvRows;

/// Query rows a tile.
const TILE: usize = 6;
/// Keys (in the scores) or value dimensions (in the weighted sum) a tile: two registers.
const WIDTH: usize = 16;

/// Runs `work` (see [`super::cpu_prefill_attention::Work`]) for head dimension `D`, a
/// multiple of [`WIDTH`].
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend<const D: usize>(
    s: &Shape,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    work: Work,
    scratch: &mut Scratch,
    dst: &mut [f32],
) {
    const { assert!(D.is_multiple_of(WIDTH) && D > 0) };
    let Work {
        seq,
        first,
        count,
        kv_heads,
        out_base,
    } = work;
    let group = s.group;
    let rows = group * count;
    let padded = rows.div_ceil(TILE) * TILE;
    // The position of the task's first token, and the keys its last one attends to.
    let base = seq.past + first;
    let len = base + count;
    refill(&mut scratch.keys_t, D * KEYS, 0.0);
    for kv_head in kv_heads {
        // The task's query rows, token-major, padded to whole tiles with zeros.
        refill(&mut scratch.queries, padded * D, 0.0);
        for r in 0..rows {
            let (i, h) = (r / group, r % group);
            let head = kv_head * group + h;
            scratch.queries[r * D..][..D]
                .copy_from_slice(&q[(head * s.tokens + seq.token + first + i) * D..][..D]);
        }
        refill(&mut scratch.acc, padded * D, 0.0);
        refill(&mut scratch.max, padded, f32::NEG_INFINITY);
        refill(&mut scratch.sum, padded, 0.0);
        let history = (kv_head * s.pool_rows + seq.start) * D;
        for k0 in (0..len).step_by(KEYS) {
            let n = KEYS.min(len - k0);
            let block = history + k0 * D..history + (k0 + n) * D;
            let block_keys = keys.f32_run(block.clone(), &mut scratch.block_keys);
            let block_values = values.f32_run(block, &mut scratch.block_values);
            fma::transpose(block_keys, D, &mut scratch.keys_t);
            // Tokens before this one are at positions before the block: they see none of it.
            let first_row = k0.saturating_sub(base) * group;
            for t0 in (first_row / TILE * TILE..rows).step_by(TILE) {
                let mut probs = [[0f32; KEYS]; TILE];
                // SAFETY: AVX2 and FMA (this function's contract); the tile's queries are
                // TILE × D floats and the transposed block D × KEYS.
                unsafe {
                    scores(
                        &scratch.queries[t0 * D..][..TILE * D],
                        &scratch.keys_t[..D * KEYS],
                        &mut probs,
                    );
                }
                let mut correction = [1f32; TILE];
                let mut reach = 0;
                for (t, (p, c)) in probs.iter_mut().zip(&mut correction).enumerate() {
                    let r = t0 + t;
                    if r < first_row || r >= rows {
                        // Nothing of this block: no weight, and the running sums stay.
                        *p = [0.0; KEYS];
                        continue;
                    }
                    let visible = n.min(base + r / group + 1 - k0);
                    reach = reach.max(visible);
                    // SAFETY: AVX2 and FMA (this function's contract).
                    *c = unsafe {
                        softmax_step(
                            p,
                            visible,
                            s.scale,
                            &mut scratch.max[r],
                            &mut scratch.sum[r],
                        )
                    };
                }
                // SAFETY: as above; the block holds `n >= reach` value rows of D floats.
                unsafe {
                    weighted_sum::<D>(
                        &probs,
                        &block_values[..reach * D],
                        &mut scratch.acc[t0 * D..][..TILE * D],
                        &correction,
                    );
                }
            }
        }
        for r in 0..rows {
            let (i, h) = (r / group, r % group);
            let head = kv_head * group + h;
            let inv = 1.0 / scratch.sum[r];
            let out = &mut dst[(i * s.heads + head) * D - out_base..][..D];
            for (o, &a) in out.iter_mut().zip(&scratch.acc[r * D..][..D]) {
                *o = a * inv;
            }
        }
    }
}

/// `probs[t][k]` = query row `t` · key `k` of the block (unscaled), from the transposed keys
/// (`[d, KEYS]`).
///
/// # Safety
/// AVX2 and FMA; `queries` is `TILE × d` and `keys_t` `d × KEYS` floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores(queries: &[f32], keys_t: &[f32], probs: &mut [[f32; KEYS]; TILE]) {
    let d = keys_t.len() / KEYS;
    debug_assert_eq!(queries.len(), TILE * d);
    for k in (0..KEYS).step_by(WIDTH) {
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        for j in 0..d {
            // SAFETY: j < d, k + 16 <= KEYS: inside `keys_t`; t * d + j < TILE * d.
            unsafe {
                let column = keys_t.as_ptr().add(j * KEYS + k);
                let (b0, b1) = (_mm256_loadu_ps(column), _mm256_loadu_ps(column.add(8)));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*queries.as_ptr().add(t * d + j));
                    acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                }
            }
        }
        for (row, acc) in probs.iter_mut().zip(acc) {
            // SAFETY: k + 16 <= KEYS.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr().add(k), acc[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(k + 8), acc[1]);
            }
        }
    }
}

/// One row's online-softmax step over a block: scales its scores, masks those from `visible`
/// on, raises the running maximum, turns the scores into `e^(score − max)` (0 where masked)
/// and adds them to the running sum. Returns the factor that rescales what the row gathered
/// before this block.
///
/// # Safety
/// AVX2 and FMA; `visible >= 1`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_step(
    row: &mut [f32; KEYS],
    visible: usize,
    scale: f32,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let limit = _mm256_set1_epi32(i32::try_from(visible).unwrap_or(i32::MAX));
    let (scale, hidden) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::NEG_INFINITY));
    let mut top = _mm256_set1_ps(*max);
    for (c, run) in row.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        let index = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * c as i32));
        let seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, index));
        // SAFETY: `run` is eight floats.
        unsafe {
            let x = _mm256_mul_ps(_mm256_loadu_ps(run.as_ptr()), scale);
            let x = _mm256_blendv_ps(hidden, x, seen);
            _mm256_storeu_ps(run.as_mut_ptr(), x);
            top = _mm256_max_ps(top, x);
        }
    }
    let top = lane_max(top);
    let correction = (*max - top).exp();
    *max = top;
    let (shift, mut total) = (_mm256_set1_ps(top), _mm256_setzero_ps());
    for run in row.as_chunks_mut::<8>().0 {
        // SAFETY: as above.
        unsafe {
            let e = super::cpu_exp::exp8(_mm256_sub_ps(_mm256_loadu_ps(run.as_ptr()), shift));
            _mm256_storeu_ps(run.as_mut_ptr(), e);
            total = _mm256_add_ps(total, e);
        }
    }
    *sum = *sum * correction + lane_sum(total);
    correction
}

/// `acc[t] = acc[t] · correction[t] + Σ_k probs[t][k] · values[k]` for the tile's rows, over
/// the `values.len() / D` value rows given.
///
/// # Safety
/// AVX2 and FMA; `acc` is `TILE × D` floats and `values` at most `KEYS` rows of `D`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum<const D: usize>(
    probs: &[[f32; KEYS]; TILE],
    values: &[f32],
    acc: &mut [f32],
    correction: &[f32; TILE],
) {
    let keys = values.len() / D;
    debug_assert!(keys <= KEYS && acc.len() == TILE * D);
    for c in (0..D).step_by(WIDTH) {
        // SAFETY: t * D + c + 16 <= TILE * D.
        let mut sums: [[__m256; 2]; TILE] = std::array::from_fn(|t| unsafe {
            let scale = _mm256_set1_ps(correction[t]);
            let at = acc.as_ptr().add(t * D + c);
            [
                _mm256_mul_ps(_mm256_loadu_ps(at), scale),
                _mm256_mul_ps(_mm256_loadu_ps(at.add(8)), scale),
            ]
        });
        for k in 0..keys {
            // SAFETY: k < keys value rows of D floats, c + 16 <= D; k < KEYS in `probs`.
            unsafe {
                let row = values.as_ptr().add(k * D + c);
                let (v0, v1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for (sum, p) in sums.iter_mut().zip(probs) {
                    let w = _mm256_broadcast_ss(p.get_unchecked(k));
                    sum[0] = _mm256_fmadd_ps(w, v0, sum[0]);
                    sum[1] = _mm256_fmadd_ps(w, v1, sum[1]);
                }
            }
        }
        for (t, sum) in sums.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe {
                let at = acc.as_mut_ptr().add(t * D + c);
                _mm256_storeu_ps(at, sum[0]);
                _mm256_storeu_ps(at.add(8), sum[1]);
            }
        }
    }
}
