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
use super::cpu_slice::with_f32;
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
const KEYS: usize = 64;
/// The largest head dimension the kernel takes (the accumulators live on the stack).
pub(super) const MAX_HEAD_DIM: usize = 256;
/// How errors name this kernel.
const KERNEL: &str = "prefill attention";

/// A worker thread's buffers, kept between tasks.
#[derive(Default)]
struct Scratch {
    /// The current key block, transposed: `[head_dim, KEYS]`.
    keys_t: Vec<f32>,
    /// Per query row: output accumulator (`head_dim` values).
    acc: Vec<f32>,
    /// Per query row: running maximum score and sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
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
        with_f32(keys, KERNEL, |keys| {
            with_f32(values, KERNEL, |values| {
                let chunks: Vec<Mutex<&mut [f32]>> = out
                    .chunks_mut(block * heads * head_dim)
                    .map(Mutex::new)
                    .collect();
                for_each_task(blocks, |task| {
                    let b = blocks - 1 - task;
                    let first = b * block;
                    let count = block.min(seq.new - first);
                    let mut dst = chunks[b]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    SCRATCH.with_borrow_mut(|scratch| {
                        shape.attend_block(q, keys, values, seq, first, count, scratch, &mut dst);
                    });
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

/// The dimensions one task needs.
#[derive(Clone, Copy)]
struct Shape {
    tokens: usize,
    heads: usize,
    /// Query heads per key/value head.
    group: usize,
    head_dim: usize,
    pool_rows: usize,
    scale: f32,
}

impl Shape {
    /// New tokens `first .. first + count` of `seq`, every head, into `dst` (`[count, heads *
    /// head_dim]`).
    #[allow(clippy::too_many_arguments)]
    fn attend_block(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        seq: PrefillRows,
        first: usize,
        count: usize,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were detected just now.
            unsafe {
                match self.head_dim {
                    64 => fma::block_64(self, q, keys, values, seq, first, count, scratch, dst),
                    128 => fma::block_128(self, q, keys, values, seq, first, count, scratch, dst),
                    _ => fma::block_any(self, q, keys, values, seq, first, count, scratch, dst),
                }
            }
            return;
        }
        attend_block::<false>(
            self,
            self.head_dim,
            q,
            keys,
            values,
            seq,
            first,
            count,
            scratch,
            dst,
        );
    }
}

/// The kernel compiled for AVX2 and FMA, with the common head dimensions as constants so the
/// accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
mod fma {
    use super::{PrefillRows, Scratch, Shape, attend_block};

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_64(
        s: &Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seq: PrefillRows,
        first: usize,
        count: usize,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        attend_block::<true>(s, 64, q, k, v, seq, first, count, scratch, dst);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_128(
        s: &Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seq: PrefillRows,
        first: usize,
        count: usize,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        attend_block::<true>(s, 128, q, k, v, seq, first, count, scratch, dst);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_any(
        s: &Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seq: PrefillRows,
        first: usize,
        count: usize,
        scratch: &mut Scratch,
        dst: &mut [f32],
    ) {
        attend_block::<true>(s, s.head_dim, q, k, v, seq, first, count, scratch, dst);
    }
}

/// `a * b + c`, fused where the caller was compiled with FMA (elsewhere `mul_add` would be a
/// library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// The work of one task: for each key/value head, the `group × count` query rows that share
/// it walk the keys a block at a time. Query row `r = h * count + i` is head `kv_head * group
/// + h` of new token `first + i`, at position `past + first + i`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_block<const FMA: bool>(
    s: &Shape,
    d: usize,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    seq: PrefillRows,
    first: usize,
    count: usize,
    scratch: &mut Scratch,
    dst: &mut [f32],
) {
    let rows = s.group * count;
    let kv_heads = s.heads / s.group;
    // Keys the block's last token attends to.
    let len = seq.past + first + count;
    scratch.keys_t.clear();
    scratch.keys_t.resize(d * KEYS, 0.0);
    for kv_head in 0..kv_heads {
        scratch.acc.clear();
        scratch.acc.resize(rows * d, 0.0);
        scratch.max.clear();
        scratch.max.resize(rows, f32::NEG_INFINITY);
        scratch.sum.clear();
        scratch.sum.resize(rows, 0.0);
        let history = (kv_head * s.pool_rows + seq.start) * d;
        for k0 in (0..len).step_by(KEYS) {
            let n = KEYS.min(len - k0);
            let block_keys = &keys[history + k0 * d..][..n * d];
            let block_values = &values[history + k0 * d..][..n * d];
            for (t, key) in block_keys.chunks_exact(d).enumerate() {
                for (j, &x) in key.iter().enumerate() {
                    scratch.keys_t[j * KEYS + t] = x;
                }
            }
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
                let mut total = 0f32;
                for score in &mut scores[..visible] {
                    *score = (*score - top).exp();
                    total += *score;
                }
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
            let out = &mut dst[(i * s.heads + head) * d..][..d];
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
        // head_dim 64 and 128 (the constant-dimension kernels), 16 and 20 (any dimension).
        for head_dim in [64, 128, 16, 20] {
            let (heads, kv_heads, tokens, pool_rows) = (8, 2, 150, 400);
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
                let want: Vec<f32> = reference(&q, &keys, &vals, seq)?.flatten_all()?.to_vec1()?;
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{seq:?} (head_dim {head_dim}): off by {worst}"
                );
            }
        }
        Ok(())
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
