//! The index of each row's largest logit, for sequences that sample greedily, on the CPU.
//!
//! candle's `argmax_keepdim` walks a row one value at a time with a compare and a branch:
//! eight rows of Llama 3's 128,256 logits were about 1 % of the 2-core Xeon's 8-stream decode
//! step. Here the maxima of chunks of 1,024 values are found sixteen lanes at a time, and the
//! first chunk that holds the row's maximum is searched for its first position, which gives
//! candle's answer: the first index of the largest value, NaNs skipped (a row that starts
//! with NaN answers 0, as candle's walk does). The rows are spread over the engine's CPU
//! pool. Before, the position was looked for over the whole row one value at a time, and
//! every row ran on the stepping thread while the pool's helper waited: 1.2 % of the
//! samples of the 2-core EPYC's 8-stream decode step.

use candle_core::{DType, Tensor};

use super::cpu_features::with_avx2;
use super::cpu_pool::for_each_chunk;
use super::cpu_slice::with_f32;
use super::error::Result;

/// Lanes the maximum is kept in.
const LANES: usize = 16;
/// Values a chunk: the maximum's first position is looked for in one chunk only.
const CHUNK: usize = 1024;
/// Logits from which the rows are spread over the pool (eight rows of Llama 3's vocabulary
/// are a million).
const MIN_SPREAD: usize = 64 * 1024;

/// `[rows, cols]` f32 logits to `[rows, 1]` u32 indices, as `logits.argmax_keepdim(1)`.
pub(super) fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let (rows, cols) = logits.dims2()?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || cols == 0 {
        return Ok(logits.argmax_keepdim(1)?);
    }
    let logits = logits.contiguous()?;
    let ids = with_f32(&logits, "argmax", |values| {
        let mut ids = vec![0u32; rows];
        if rows > 1 && values.len() >= MIN_SPREAD {
            for_each_chunk(&mut ids, 1, |row, id| {
                id[0] = first_max(&values[row * cols..(row + 1) * cols]);
            });
        } else {
            for (id, row) in ids.iter_mut().zip(values.chunks_exact(cols)) {
                *id = first_max(row);
            }
        }
        Ok(ids)
    })?;
    Ok(Tensor::from_vec(ids, (rows, 1), logits.device())?)
}

/// The first index of `row`'s largest value, as candle's walk finds it.
fn first_max(row: &[f32]) -> u32 {
    with_avx2(
        #[inline(always)]
        || first_max_portable(row),
    )
}

#[inline(always)]
fn first_max_portable(row: &[f32]) -> u32 {
    let Some(&first) = row.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    // The first chunk whose maximum is strictly larger than all before it holds the first
    // position of the row's maximum (NaNs never win a comparison); only it is searched.
    let (mut top, mut at) = (first, 0);
    for (c, chunk) in row.chunks(CHUNK).enumerate() {
        let largest = chunk_max(chunk, first);
        if largest > top {
            (top, at) = (largest, c * CHUNK);
        }
    }
    let offset = row[at..].iter().position(|&v| v == top).unwrap_or(0);
    (at + offset) as u32
}

/// The largest of `start` and the non-NaN values of `chunk`, sixteen lanes at a time.
#[inline(always)]
fn chunk_max(chunk: &[f32], start: f32) -> f32 {
    let mut lanes = [start; LANES];
    let mut blocks = chunk.chunks_exact(LANES);
    for block in &mut blocks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(block[i]);
        }
    }
    blocks
        .remainder()
        .iter()
        .copied()
        .fold(lanes.into_iter().fold(start, f32::max), f32::max)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn finds_candles_argmax_ties_and_nans_included() -> Result<()> {
        let cols = 1000;
        let mut rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..cols)
                    .map(|i| ((i * 37 + r * 11) % 101) as f32 * 0.5 - 20.0)
                    .collect()
            })
            .collect();
        // Ties (first wins), the largest value in the tail, NaNs before and at the start,
        // signed zeros, one value.
        rows[1][17] = 99.0;
        rows[1][640] = 99.0;
        rows[2][cols - 1] = 1e9;
        rows[3][4] = f32::NAN;
        let mut nan_first = vec![1.0; cols];
        nan_first[0] = f32::NAN;
        nan_first[9] = 5.0;
        rows.push(nan_first);
        let mut zeros = vec![-1.0; cols];
        zeros[3] = -0.0;
        zeros[8] = 0.0;
        rows.push(zeros);
        rows.push(vec![f32::NEG_INFINITY; cols]);
        let n = rows.len();
        let t = Tensor::from_vec(rows.concat(), (n, cols), &Device::Cpu)?;
        let got: Vec<u32> = argmax_rows(&t)?.flatten_all()?.to_vec1()?;
        let want: Vec<u32> = t.argmax_keepdim(1)?.flatten_all()?.to_vec1()?;
        assert_eq!(got, want);
        assert_eq!(got[1], 17);
        assert_eq!(got[2], (cols - 1) as u32);
        assert_eq!(argmax_rows(&t)?.dims(), [n, 1]);
        let one = Tensor::from_vec(vec![3f32], (1, 1), &Device::Cpu)?;
        assert_eq!(argmax_rows(&one)?.flatten_all()?.to_vec1::<u32>()?, [0]);
        Ok(())
    }

    #[test]
    fn rows_spread_over_the_pool_give_candles_answer() -> Result<()> {
        // Eight rows of 9,001 logits: over MIN_SPREAD, with a tail of one.
        let (rows, cols) = (8, 9001);
        assert!(rows * cols >= MIN_SPREAD && cols % LANES != 0);
        let mut values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) % 10_007) as f32 / 100.0)
            .collect();
        let top = 500.0;
        // Row 0: the maximum twice, in the second chunk and a later one. Row 1: twice in the
        // first chunk and a later one. Row 2: in the tail only. Row 3: the first value, repeated.
        // Row 4: NaNs around it. Row 5: just before the tail.
        for (row, at) in [
            (0, 1500),
            (0, 4096),
            (1, 20),
            (1, 4020),
            (2, cols - 1),
            (3, 0),
            (3, 900),
        ] {
            values[row * cols + at] = top;
        }
        values[4 * cols + 5] = f32::NAN;
        values[4 * cols + 6] = top;
        values[4 * cols + 7] = f32::NAN;
        values[5 * cols + cols - 2] = top;
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        let got: Vec<u32> = argmax_rows(&t)?.flatten_all()?.to_vec1()?;
        let want: Vec<u32> = t.argmax_keepdim(1)?.flatten_all()?.to_vec1()?;
        assert_eq!(got, want);
        assert_eq!(
            &got[..6],
            &[1500, 20, (cols - 1) as u32, 0, 6, (cols - 2) as u32]
        );
        Ok(())
    }
}
