//! Attention of the sequences that decode one token, on the CPU, in one pass: every
//! (sequence, key/value head) pair is a task on the engine's CPU pool ([`super::cpu_pool`])
//! that reads the sequence's keys and values in place in the pool, once for all the query
//! heads that share them.
//!
//! Through candle the same work is about ten operations per sequence and layer (two matrix
//! products, scaling, softmax, copies), each allocating its output and run one sequence at a
//! time while the pool's helpers wait. The arithmetic is small (a 1B model's decode step
//! attends over a few million values), so what this saves is that overhead, and the batch's
//! sequences now run side by side. Each task runs [`super::cpu_decode_kernel`] for its one
//! token where the CPU has AVX2, FMA and F16C and the head dimension is 16, 32, 64 or 128
//! (every Llama 3 shape), and otherwise the kernel of [`super::cpu_prefill_attention`]. The
//! results equal candle's up to float rounding:
//! `softmax(q·kᵀ / √d) v` in f32, each sequence computed the same way whatever the batch.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::cpu_decode_kernel as decode_kernel;
use super::cpu_pool::for_each_task;
use super::cpu_prefill_attention as prefill;
use super::cpu_slice::{KvRows, with_f32, with_kv};
use super::error::{EngineError, Result};

/// One decoding sequence: its query token among the step's packed tokens and its history in
/// the pool (the new token's row included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DecodeRow {
    /// Index of the sequence's new token among the step's tokens.
    pub(super) token: usize,
    /// Pool row of the sequence's first token.
    pub(super) start: usize,
    /// Tokens the sequence attends to (its cached ones and the new one).
    pub(super) len: usize,
}

/// How errors name this kernel.
const KERNEL: &str = "decode attention";

/// Whether [`decode_attention`] (and [`prefill::prefill_attention`]) can run on this device,
/// for queries of `dtype`, a key/value pool of `kv_dtype` and heads of this dimension.
pub(super) fn supported(device: &Device, dtype: DType, kv_dtype: DType, head_dim: usize) -> bool {
    device.is_cpu()
        && dtype == DType::F32
        && matches!(kv_dtype, DType::F32 | DType::F16)
        && (1..=prefill::MAX_HEAD_DIM).contains(&head_dim)
}

/// `q` is `[heads, tokens, head_dim]` (every packed token of the step), `keys` and `values`
/// one layer of the pool (`[kv_heads, rows, head_dim]`). Returns `[rows.len(), heads *
/// head_dim]`: row `i` is the attention output of `rows[i]`.
pub(super) fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    rows: &[DecodeRow],
) -> Result<Tensor> {
    let (heads, tokens, head_dim) = q.dims3()?;
    let (kv_heads, pool_rows, kv_dim) = keys.dims3()?;
    if values.dims() != keys.dims() || kv_dim != head_dim || kv_heads == 0 {
        return Err(EngineError::InvalidInput(format!(
            "decode attention: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            keys.dims(),
            values.dims()
        )));
    }
    if head_dim == 0 || head_dim > prefill::MAX_HEAD_DIM {
        return Err(EngineError::InvalidInput(format!(
            "decode attention: heads of dimension {head_dim} (at most {})",
            prefill::MAX_HEAD_DIM
        )));
    }
    if heads % kv_heads != 0 {
        return Err(EngineError::InvalidInput(format!(
            "decode attention: {heads} query heads do not share {kv_heads} key/value heads evenly"
        )));
    }
    if let Some(bad) = rows
        .iter()
        .find(|r| r.token >= tokens || r.len == 0 || r.start + r.len > pool_rows)
    {
        return Err(EngineError::InvalidInput(format!(
            "decode attention: {bad:?} is outside {tokens} tokens or {pool_rows} pool rows"
        )));
    }
    let shape = prefill::Shape {
        tokens,
        heads,
        group: heads / kv_heads,
        head_dim,
        pool_rows,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let q = q.contiguous()?;
    let mut out = vec![0f32; rows.len() * heads * head_dim];
    with_f32(&q, KERNEL, |q| {
        with_kv(keys, KERNEL, |keys| {
            with_kv(values, KERNEL, |values| {
                // Task `s * kv_heads + g` writes query heads `g * group ..` of sequence `s`:
                // exactly chunk `s * kv_heads + g` of the output.
                let chunks: Vec<Mutex<&mut [f32]>> = out
                    .chunks_mut(shape.group * head_dim)
                    .map(Mutex::new)
                    .collect();
                let kernel = decode_kernel::supported(head_dim);
                for_each_task(chunks.len(), |task| {
                    let (row, kv_head) = (rows[task / kv_heads], task % kv_heads);
                    let mut dst = chunks[task]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if kernel && attend_here(&shape, q, keys, values, row, kv_head, &mut dst) {
                        return;
                    }
                    let work = prefill::Work {
                        seq: prefill::PrefillRows {
                            token: row.token,
                            start: row.start,
                            past: row.len - 1,
                            new: 1,
                        },
                        first: 0,
                        count: 1,
                        kv_heads: kv_head..kv_head + 1,
                        out_base: kv_head * shape.group * head_dim,
                    };
                    shape.run(q, keys, values, work, &mut dst[..]);
                });
                Ok(())
            })
        })
    })?;
    Ok(Tensor::from_vec(
        out,
        (rows.len(), heads * head_dim),
        &Device::Cpu,
    )?)
}

thread_local! {
    static SCRATCH: RefCell<decode_kernel::Scratch> =
        RefCell::new(decode_kernel::Scratch::default());
}

/// Runs task `(row, kv_head)` through [`decode_kernel`] with this thread's buffers: the
/// group's query rows scaled by `1/√d`, the sequence's keys and values of the head in place.
/// False where the kernel does not take the shape (the caller then runs the prefill kernel).
fn attend_here(
    s: &prefill::Shape,
    q: &[f32],
    keys: KvRows<'_>,
    values: KvRows<'_>,
    row: DecodeRow,
    kv_head: usize,
    dst: &mut [f32],
) -> bool {
    let d = s.head_dim;
    let history =
        (kv_head * s.pool_rows + row.start) * d..(kv_head * s.pool_rows + row.start + row.len) * d;
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.q.clear();
        for h in kv_head * s.group..(kv_head + 1) * s.group {
            let query = &q[(h * s.tokens + row.token) * d..][..d];
            scratch.q.extend(query.iter().map(|&x| x * s.scale));
        }
        decode_kernel::attend(
            d,
            s.group,
            keys.slice(history.clone()),
            values.slice(history),
            scratch,
            dst,
        )
    })
}

#[cfg(test)]
mod tests {
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
    fn reference(q: &Tensor, keys: &Tensor, values: &Tensor, row: DecodeRow) -> Result<Tensor> {
        let (heads, _, head_dim) = q.dims3()?;
        let kv_heads = keys.dim(0)?;
        let group = heads / kv_heads;
        let q = q
            .narrow(1, row.token, 1)?
            .contiguous()?
            .reshape((kv_heads, group, head_dim))?;
        let k = keys.narrow(1, row.start, row.len)?.contiguous()?;
        let v = values.narrow(1, row.start, row.len)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&v)?.reshape((1, heads * head_dim))?)
    }

    #[test]
    fn matches_candle_for_every_sequence_of_a_batch() -> Result<()> {
        // 1 to 8 query heads on each of 2 key/value heads (the kernel takes up to four heads
        // at a time). Head dimensions 16, 32, 64 and 128 run the
        // AVX2 decode kernel where the CPU has it, 20 the prefill kernel; queries scaled up
        // make the softmax peaky, so the rescaling between 64-key blocks shows. An f16 pool
        // is read converted to f32: the result is candle's on the same rounded values.
        for (((head_dim, sharpness), kv_dtype), group) in [
            (64, 1.0),
            (64, 8.0),
            (20, 1.0),
            (16, 1.0),
            (32, 4.0),
            (128, 1.0),
        ]
        .into_iter()
        .flat_map(|shape| [(shape, DType::F32), (shape, DType::F16)])
        .flat_map(|case| [1, 2, 3, 4, 5, 8].map(|group| (case, group)))
        {
            let (kv_heads, tokens, pool_rows) = (2, 5, 200);
            let heads = group * kv_heads;
            let dev = Device::Cpu;
            let q = (Tensor::from_vec(
                values(heads * tokens * head_dim, 1),
                (heads, tokens, head_dim),
                &dev,
            )? * sharpness)?;
            let keys = Tensor::from_vec(
                values(kv_heads * pool_rows * head_dim, 2),
                (kv_heads, pool_rows, head_dim),
                &dev,
            )?;
            let vals = Tensor::from_vec(
                values(kv_heads * pool_rows * head_dim, 3),
                (kv_heads, pool_rows, head_dim),
                &dev,
            )?;
            let (keys, vals) = (keys.to_dtype(kv_dtype)?, vals.to_dtype(kv_dtype)?);
            let (exact_keys, exact_vals) = (keys.to_dtype(DType::F32)?, vals.to_dtype(DType::F32)?);
            let rows = [
                DecodeRow {
                    token: 4,
                    start: 0,
                    len: 1,
                },
                DecodeRow {
                    token: 0,
                    start: 3,
                    len: 17,
                },
                DecodeRow {
                    token: 2,
                    start: 20,
                    len: 20,
                },
                // Three 64-key blocks, the last of 22 keys.
                DecodeRow {
                    token: 3,
                    start: 45,
                    len: 150,
                },
            ];
            let out = decode_attention(&q, &keys, &vals, &rows)?;
            assert_eq!(out.dims(), [rows.len(), heads * head_dim]);
            for (i, &row) in rows.iter().enumerate() {
                let got: Vec<f32> = out.narrow(0, i, 1)?.flatten_all()?.to_vec1()?;
                let want: Vec<f32> = reference(&q, &exact_keys, &exact_vals, row)?
                    .flatten_all()?
                    .to_vec1()?;
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{row:?} (head_dim {head_dim}, group {group}, {kv_dtype:?} pool): off by {worst}"
                );
            }
            // A sequence's output does not depend on the others in the batch.
            let alone = decode_attention(&q, &keys, &vals, &rows[1..2])?;
            assert_eq!(
                alone.flatten_all()?.to_vec1::<f32>()?,
                out.narrow(0, 1, 1)?.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn rejects_rows_outside_the_pool_or_the_step() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 2, 8), DType::F32, &dev)?;
        let kv = Tensor::zeros((2, 10, 8), DType::F32, &dev)?;
        for bad in [
            DecodeRow {
                token: 2,
                start: 0,
                len: 1,
            },
            DecodeRow {
                token: 0,
                start: 5,
                len: 6,
            },
            DecodeRow {
                token: 0,
                start: 0,
                len: 0,
            },
        ] {
            let err = decode_attention(&q, &kv, &kv, &[bad]).expect_err("rejected");
            assert!(err.to_string().contains("decode attention"), "{err}");
        }
        let odd = Tensor::zeros((3, 2, 8), DType::F32, &dev)?;
        assert!(decode_attention(&odd, &kv, &kv, &[]).is_err());
        Ok(())
    }
}
