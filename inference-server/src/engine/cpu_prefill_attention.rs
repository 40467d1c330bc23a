//! Causal attention of a prefilling sequence on the CPU, in one pass over its keys and values
//! in place in the pool: every block of the sequence's new tokens is a task on the engine's
//! CPU pool ([`super::cpu_pool`]), which walks the keys a block of 64 at a time with a running
//! (online) softmax, so no `[heads, new, past + new]` score matrix is ever built.
//!
//! Through candle a 512-token chunk of the Llama-3.2-1B shape built, per layer, four such
//! matrices of 32 MB (scores, scaled, masked, softmaxed), each a fresh mapping whose pages the
//! kernel faults in and clears, and multiplied the masked half too. Here each key block is
//! transposed once into a small buffer that every query row of the block's heads reads from
//! L1, the keys past a token's position are never read, and the work is split over both
//! threads. The result equals candle's `softmax(q·kᵀ / √d + mask) v` up to float rounding.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{Device, Tensor};

use super::cpu_pool::for_each_task;
use super::cpu_slice::{KvRows, with_f32, with_kv};
use super::error::{EngineError, Result};

/// One prefilling sequence of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PrefillRows {
    /// Index of the sequence's first new token among the step's packed tokens.
    pub(super) token: usize,
    /// Pool row of the sequence's first token.
    pub(super) start: usize,
    /// Tokens already in the cache before this step.
    pub(super) past: usize,
    /// New tokens (their keys and values are already written to the pool).
    pub(super) new: usize,
}

/// Keys a block: the transposed block is `head_dim × KEYS` floats (32 KiB at head_dim 128).
pub(super) const KEYS: usize = 64;
/// The largest head dimension the kernel takes (the accumulators live on the stack).
pub(super) const MAX_HEAD_DIM: usize = 256;
/// How errors name this kernel.
const KERNEL: &str = "prefill attention";

/// A worker thread's buffers, kept between tasks.
#[derive(Default)]
pub(super) struct Scratch {
    /// The current key block, transposed: `[head_dim, KEYS]`.
    pub(super) keys_t: Vec<f32>,
    /// Per query row: output accumulator (`head_dim` values).
    pub(super) acc: Vec<f32>,
    /// Per query row: running maximum score and sum of exponentials.
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
    /// The current block's keys and values converted to f32 (for an f16 pool).
    pub(super) block_keys: Vec<f32>,
    pub(super) block_values: Vec<f32>,
    /// The tiled kernel's query rows, gathered token-major ([`super::cpu_prefill_tiles`]).
    pub(super) queries: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `q` is `[heads, tokens, head_dim]` (every packed token of the step), `keys` and `values`
/// one layer of the pool (`[kv_heads, rows, head_dim]`). Returns `[seq.new, heads *
/// head_dim]`: the attention output of the sequence's new tokens, each attending to the
/// sequence's tokens up to its own position.
pub(super) fn prefill_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    seq: PrefillRows,
) -> Result<Tensor> {
    let (heads, tokens, head_dim) = q.dims3()?;
    let (kv_heads, pool_rows, kv_dim) = keys.dims3()?;
    if values.dims() != keys.dims() || kv_dim != head_dim || kv_heads == 0 {
        return Err(EngineError::InvalidInput(format!(
            "{KERNEL}: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            keys.dims(),
            values.dims()
        )));
    }
    if heads % kv_heads != 0 || head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(EngineError::InvalidInput(format!(
            "{KERNEL}: {heads} query heads on {kv_heads} key/value heads of dimension \
             {head_dim} (needs an even split and at most {MAX_HEAD_DIM})"
        )));
    }
    if seq.new == 0 || seq.token + seq.new > tokens || seq.start + seq.past + seq.new > pool_rows {
        return Err(EngineError::InvalidInput(format!(
            "{KERNEL}: {seq:?} is outside {tokens} tokens or {pool_rows} pool rows"
        )));
    }
    let shape = Shape {
        tokens,
        heads,
        group: heads / kv_heads,
        head_dim,
        pool_rows,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    // Blocks of up to 16 tokens, at least eight tasks where the chunk allows: the later
    // blocks attend to more keys, so they are handed out first.
    let block = seq.new.div_ceil(8).clamp(1, 16);
    let blocks = seq.new.div_ceil(block);
    let q = q.contiguous()?;
    let mut out = vec![0f32; seq.new * heads * head_dim];
    with_f32(&q, KERNEL, |q| {
        with_kv(keys, KERNEL, |keys| {
            with_kv(values, KERNEL, |values| {
                let chunks: Vec<Mutex<&mut [f32]>> = out
                    .chunks_mut(block * heads * head_dim)
                    .map(Mutex::new)
                    .collect();
                for_each_task(blocks, |task| {
                    let b = blocks - 1 - task;
                    let first = b * block;
                    let work = Work {
                        seq,
                        first,
                        count: block.min(seq.new - first),
                        kv_heads: 0..kv_heads,
                        out_base: 0,
                    };
                    let mut dst = chunks[b]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    shape.run(q, keys, values, work, &mut dst);
                });
                Ok(())
            })
        })
    })?;
    Ok(Tensor::from_vec(
        out,
        (seq.new, heads * head_dim),
        &Device::Cpu,
    )?)
}

/// The dimensions of one layer's attention, as the kernel reads its slices.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    /// Packed tokens of the step (the second dimension of the queries).
    pub(super) tokens: usize,
    pub(super) heads: usize,
    /// Query heads per key/value head.
    pub(super) group: usize,
    pub(super) head_dim: usize,
    /// Rows of the key/value pool.
    pub(super) pool_rows: usize,
    /// `1 / √head_dim`.
    pub(super) scale: f32,
}

/// What one task computes: new tokens `first .. first + count` of `seq`, for the query heads
/// of key/value heads `kv_heads`, into a destination whose element `(i * heads + head) *
/// head_dim - out_base` is token `first + i`'s output of `head`.
#[derive(Clone)]
pub(super) struct Work {
    pub(super) seq: PrefillRows,
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) kv_heads: std::ops::Range<usize>,
    pub(super) out_base: usize,
}

impl Shape {
    /// Runs `work` on the calling thread with its buffers, through the fastest kernel the
    /// CPU has.
    pub(super) fn run(
        &self,
        q: &[f32],
        keys: KvRows<'_>,
        values: KvRows<'_>,
        work: Work,
        dst: &mut [f32],
    ) {
        SCRATCH.with_borrow_mut(|scratch| {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: AVX2 and FMA were detected just now.
                unsafe {
                    match self.head_dim {
                        64 => fma::block_64(self, q, keys, values, work, scratch, dst),
                        128 => fma::block_128(self, q, keys, values, work, scratch, dst),
                        _ => fma::block_any(self, q, keys, values, work, scratch, dst),
                    }
                }
                return;
            }
            attend::<false>(self, self.head_dim, q, keys, values, work, scratch, dst);
        });
    }
}

/// The kernel compiled for AVX2 and FMA, with the common head dimensions as constants so the
/// accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
pub(super) mod fma {
    use std::arch::x86_64::*;

    use super::{KEYS, KvRows, Scratch, Shape, Work, attend, transpose_scalar};

    /// [`super::transpose`] in 8 × 8 tiles: eight keys' eight dimensions are loaded, turned
    /// with unpack, shuffle and lane permutes, and stored as eight columns.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::engine) fn transpose(keys: &[f32], d: usize, keys_t: &mut [f32]) {
        let n = keys.len() / d;
        let (tiled_keys, tiled_dims) = (n / 8 * 8, d / 8 * 8);
        for t0 in (0..tiled_keys).step_by(8) {
            for j0 in (0..tiled_dims).step_by(8) {
                // SAFETY: each slice is eight floats long, so the unaligned load reads inside it.
                let r: [__m256; 8] = std::array::from_fn(|i| unsafe {
                    _mm256_loadu_ps(keys[(t0 + i) * d + j0..][..8].as_ptr())
                });
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                // Dimensions j and j + 4 of four keys each (rows 0-3, then 4-7).
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                for j in 0..4 {
                    let low = _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]);
                    let high = _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]);
                    // SAFETY: as for the loads, eight floats a slice.
                    unsafe {
                        _mm256_storeu_ps(keys_t[(j0 + j) * KEYS + t0..][..8].as_mut_ptr(), low);
                        _mm256_storeu_ps(
                            keys_t[(j0 + j + 4) * KEYS + t0..][..8].as_mut_ptr(),
                            high,
                        );
                    }
                }
            }
        }
        transpose_scalar(keys, d, tiled_keys, tiled_dims, keys_t);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_64(
        s: &Shape,
        q: &[f32],
        k: KvRows<'_>,
        v: KvRows<'_>,
        work: Work,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        // SAFETY: AVX2 and FMA, which this function is compiled for and its caller detected.
        unsafe { super::super::cpu_prefill_tiles::attend::<64>(s, q, k, v, work, scratch, dst) };
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_128(
        s: &Shape,
        q: &[f32],
        k: KvRows<'_>,
        v: KvRows<'_>,
        work: Work,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        // SAFETY: as in `block_64`.
        unsafe { super::super::cpu_prefill_tiles::attend::<128>(s, q, k, v, work, scratch, dst) };
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_any(
        s: &Shape,
        q: &[f32],
        k: KvRows<'_>,
        v: KvRows<'_>,
        work: Work,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        attend::<true>(s, s.head_dim, q, k, v, work, scratch, dst);
    }
}

/// Makes `buffer` `len` copies of `value`, keeping its allocation (the kernels' per-thread
/// scratch buffers).
pub(super) fn refill(buffer: &mut Vec<f32>, len: usize, value: f32) {
    buffer.clear();
    buffer.resize(len, value);
}

/// `a * b + c`, fused where the caller was compiled with FMA (elsewhere `mul_add` would be a
/// library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Replaces each score `s` by `e^(s - top)` and returns their sum: eight at a time through
/// [`super::cpu_exp::exp8`] where the caller was compiled with AVX2 and FMA (the C library's
/// scalar `expf` was about a sixth of the kernel's time in decode). `FMA` is set only by
/// kernels that run where AVX2 and FMA were detected: the `fma` module's here.
#[inline(always)]
fn exponentials<const FMA: bool>(scores: &mut [f32], top: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        let mut sum = 0f32;
        let (runs, tail) = scores.as_chunks_mut::<8>();
        for run in runs {
            // SAFETY: `FMA` is set only where AVX2 and FMA were detected (see above).
            sum += unsafe { exp_run(run, top) };
        }
        if !tail.is_empty() {
            // The short last run, padded with −∞, whose exponential is 0.
            let mut lanes = [f32::NEG_INFINITY; 8];
            lanes[..tail.len()].copy_from_slice(tail);
            // SAFETY: as above.
            sum += unsafe { exp_run(&mut lanes, top) };
            tail.copy_from_slice(&lanes[..tail.len()]);
        }
        return sum;
    }
    let mut total = 0f32;
    for score in scores {
        *score = (*score - top).exp();
        total += *score;
    }
    total
}

/// Replaces eight scores `s` by `e^(s - top)`; returns their sum.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_run(run: &mut [f32; 8], top: f32) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: `run` is the eight floats loaded and stored.
    unsafe {
        let x = _mm256_sub_ps(_mm256_loadu_ps(run.as_ptr()), _mm256_set1_ps(top));
        _mm256_storeu_ps(run.as_mut_ptr(), super::cpu_exp::exp8(x));
    }
    run.iter().sum()
}

/// Writes the `n × d` row-major keys `keys` as `[d, KEYS]` columns into `keys_t`: with AVX2
/// eight by eight in registers where the caller was compiled for it.
#[inline(always)]
fn transpose<const FMA: bool>(keys: &[f32], d: usize, keys_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: `FMA` is set only by the `fma` module's kernels, which run where AVX2 and
        // FMA were detected.
        unsafe { fma::transpose(keys, d, keys_t) };
        return;
    }
    transpose_scalar(keys, d, 0, 0, keys_t);
}

/// The scalar transpose of `keys` (see [`transpose`]), of its keys from `from_key` on and,
/// for the keys before, of the dimensions from `from_dim` on.
fn transpose_scalar(keys: &[f32], d: usize, from_key: usize, from_dim: usize, keys_t: &mut [f32]) {
    for (t, key) in keys.chunks_exact(d).enumerate() {
        let first = if t < from_key { from_dim } else { 0 };
        for (j, &x) in key.iter().enumerate().skip(first) {
            keys_t[j * KEYS + t] = x;
        }
    }
}

/// The work of one task: for each key/value head, the `group × count` query rows that share
/// it walk the keys a block at a time. Query row `r = h * count + i` is head
/// `kv_head * group + h` of new token `first + i`, at position `past + first + i`. `d` is the
/// head dimension (a constant where the caller passes one).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend<const FMA: bool>(
    s: &Shape,
    d: usize,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    work: Work,
    scratch: &mut Scratch,
    dst: &mut [f32],
) {
    let Work {
        seq,
        first,
        count,
        kv_heads,
        out_base,
    } = work;
    let rows = s.group * count;
    // Keys the block's last token attends to.
    let len = seq.past + first + count;
    refill(&mut scratch.keys_t, d * KEYS, 0.0);
    for kv_head in kv_heads {
        refill(&mut scratch.acc, rows * d, 0.0);
        refill(&mut scratch.max, rows, f32::NEG_INFINITY);
        refill(&mut scratch.sum, rows, 0.0);
        let history = (kv_head * s.pool_rows + seq.start) * d;
        for k0 in (0..len).step_by(KEYS) {
            let n = KEYS.min(len - k0);
            let block = history + k0 * d..history + (k0 + n) * d;
            let block_keys = keys.f32_run(block.clone(), &mut scratch.block_keys);
            let block_values = values.f32_run(block, &mut scratch.block_values);
            transpose::<FMA>(block_keys, d, &mut scratch.keys_t);
            for r in 0..rows {
                let (h, i) = (r / count, r % count);
                let position = seq.past + first + i;
                if k0 > position {
                    continue;
                }
                // Keys of this block the row may see: up to its own position.
                let visible = n.min(position + 1 - k0);
                let head = kv_head * s.group + h;
                let query = &q[(head * s.tokens + seq.token + first + i) * d..][..d];
                let mut scores = [0f32; KEYS];
                for (j, &qj) in query.iter().enumerate() {
                    let column = &scratch.keys_t[j * KEYS..][..KEYS];
                    for (score, &kt) in scores.iter_mut().zip(column) {
                        *score = madd::<FMA>(qj, kt, *score);
                    }
                }
                let mut top = scratch.max[r];
                for score in &mut scores[..visible] {
                    *score *= s.scale;
                    top = top.max(*score);
                }
                // Rescale what the row gathered so far to the new maximum.
                let correction = (scratch.max[r] - top).exp();
                scratch.max[r] = top;
                let total = exponentials::<FMA>(&mut scores[..visible], top);
                scratch.sum[r] = scratch.sum[r] * correction + total;
                let mut acc = [0f32; MAX_HEAD_DIM];
                let acc = &mut acc[..d];
                for (a, &x) in acc.iter_mut().zip(&scratch.acc[r * d..][..d]) {
                    *a = x * correction;
                }
                for (&p, value) in scores[..visible].iter().zip(block_values.chunks_exact(d)) {
                    for (a, &x) in acc.iter_mut().zip(value) {
                        *a = madd::<FMA>(p, x, *a);
                    }
                }
                scratch.acc[r * d..][..d].copy_from_slice(acc);
            }
        }
        for r in 0..rows {
            let (h, i) = (r / count, r % count);
            let head = kv_head * s.group + h;
            let inv = 1.0 / scratch.sum[r];
            let out = &mut dst[(i * s.heads + head) * d - out_base..][..d];
            for (o, &a) in out.iter_mut().zip(&scratch.acc[r * d..][..d]) {
                *o = a * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The same attention through candle's operations, as `LlamaModel::attend` runs it.
    fn reference(q: &Tensor, keys: &Tensor, values: &Tensor, seq: PrefillRows) -> Result<Tensor> {
        let (heads, _, head_dim) = q.dims3()?;
        let kv_heads = keys.dim(0)?;
        let group = heads / kv_heads;
        let total = seq.past + seq.new;
        let q = q.narrow(1, seq.token, seq.new)?.contiguous()?.reshape((
            kv_heads,
            group * seq.new,
            head_dim,
        ))?;
        let k = keys.narrow(1, seq.start, total)?.contiguous()?;
        let v = values.narrow(1, seq.start, total)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let mask: Vec<f32> = (0..seq.new)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > seq.past + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (seq.new, total), &Device::Cpu)?;
        let scores = scores
            .reshape((kv_heads, group, seq.new, total))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * seq.new, total))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs
            .matmul(&v)?
            .reshape((heads, seq.new, head_dim))?
            .transpose(0, 1)?
            .reshape((seq.new, heads * head_dim))?)
    }

    #[test]
    fn matches_candle_for_chunks_with_and_without_a_past() -> Result<()> {
        let dev = Device::Cpu;
        // head_dim 64 and 128 (the tiled kernel), 16 and 20 (the one-row kernel); f32 and
        // f16 pools (an f16 one gives candle's result on the same rounded values); groups of
        // 4, 3 and 1 query heads a key/value head (tiles of six rows across tokens).
        for (head_dim, kv_dtype, (heads, kv_heads)) in [64, 128, 16, 20].into_iter().flat_map(|d| {
            [(d, DType::F32), (d, DType::F16)]
                .into_iter()
                .flat_map(move |(d, t)| [(8, 2), (6, 2), (2, 2)].map(|g| (d, t, g)))
        }) {
            let (tokens, pool_rows) = (150, 400);
            let q = Tensor::from_vec(
                values(heads * tokens * head_dim, 1),
                (heads, tokens, head_dim),
                &dev,
            )?;
            // Scores of a few units, so the softmax is far from uniform.
            let keys = (Tensor::from_vec(
                values(kv_heads * pool_rows * head_dim, 2),
                (kv_heads, pool_rows, head_dim),
                &dev,
            )? * 3.0)?;
            let vals = Tensor::from_vec(
                values(kv_heads * pool_rows * head_dim, 3),
                (kv_heads, pool_rows, head_dim),
                &dev,
            )?;
            let (keys, vals) = (keys.to_dtype(kv_dtype)?, vals.to_dtype(kv_dtype)?);
            let (exact_keys, exact_vals) = (keys.to_dtype(DType::F32)?, vals.to_dtype(DType::F32)?);
            for seq in [
                // A whole prompt, one key block and a bit.
                PrefillRows {
                    token: 0,
                    start: 0,
                    past: 0,
                    new: 70,
                },
                // A later chunk after 130 cached tokens, behind another sequence's tokens.
                PrefillRows {
                    token: 40,
                    start: 150,
                    past: 130,
                    new: 110,
                },
                // Two tokens, and one block of keys exactly.
                PrefillRows {
                    token: 3,
                    start: 7,
                    past: 62,
                    new: 2,
                },
                PrefillRows {
                    token: 10,
                    start: 1,
                    past: 0,
                    new: 64,
                },
            ] {
                let got: Vec<f32> = prefill_attention(&q, &keys, &vals, seq)?
                    .flatten_all()?
                    .to_vec1()?;
                let want: Vec<f32> = reference(&q, &exact_keys, &exact_vals, seq)?
                    .flatten_all()?
                    .to_vec1()?;
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{seq:?} (head_dim {head_dim}, {heads}/{kv_heads} heads, {kv_dtype:?} pool): \
                     off by {worst}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_portable_kernel_matches_the_dispatched_one() {
        // The dispatched kernel is the AVX2/FMA one on x86-64 machines with them; the
        // portable one runs elsewhere. Both over the same task, dimensions with and without
        // a tail of eight, keys with a partial last block.
        for head_dim in [64, 20] {
            let (heads, kv_heads, tokens, pool_rows) = (4, 2, 30, 100);
            let q = values(heads * tokens * head_dim, 4);
            let keys = values(kv_heads * pool_rows * head_dim, 5);
            let vals = values(kv_heads * pool_rows * head_dim, 6);
            let shape = Shape {
                tokens,
                heads,
                group: heads / kv_heads,
                head_dim,
                pool_rows,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let work = Work {
                seq: PrefillRows {
                    token: 5,
                    start: 3,
                    past: 71,
                    new: 20,
                },
                first: 4,
                count: 9,
                kv_heads: 1..2,
                out_base: 2 * head_dim,
            };
            let len = 9 * heads * head_dim;
            let mut dispatched = vec![0f32; len];
            let (keys, vals) = (KvRows::F32(&keys), KvRows::F32(&vals));
            shape.run(&q, keys, vals, work.clone(), &mut dispatched);
            let mut portable = vec![0f32; len];
            let mut scratch = Scratch::default();
            attend::<false>(
                &shape,
                head_dim,
                &q,
                keys,
                vals,
                work,
                &mut scratch,
                &mut portable,
            );
            let worst = dispatched
                .iter()
                .zip(&portable)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "head_dim {head_dim}: off by {worst}");
            assert!(
                portable.iter().any(|&x| x != 0.0),
                "the task wrote its heads"
            );
        }
    }

    #[test]
    fn rejects_rows_outside_the_pool_or_the_step() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 6, 8), DType::F32, &dev)?;
        let kv = Tensor::zeros((2, 10, 8), DType::F32, &dev)?;
        for bad in [
            PrefillRows {
                token: 4,
                start: 0,
                past: 0,
                new: 3,
            },
            PrefillRows {
                token: 0,
                start: 5,
                past: 3,
                new: 3,
            },
            PrefillRows {
                token: 0,
                start: 0,
                past: 0,
                new: 0,
            },
        ] {
            let err = prefill_attention(&q, &kv, &kv, bad).expect_err("rejected");
            assert!(err.to_string().contains(KERNEL), "{err}");
        }
        let odd = Tensor::zeros((3, 6, 8), DType::F32, &dev)?;
        let seq = PrefillRows {
            token: 0,
            start: 0,
            past: 0,
            new: 2,
        };
        assert!(prefill_attention(&odd, &kv, &kv, seq).is_err());
        Ok(())
    }
}
