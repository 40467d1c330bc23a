//! The index of each row's largest logit, for sequences that sample greedily, on the CPU.
//!
//! candle's `argmax_keepdim` walks a row one value at a time with a compare and a branch:
//! eight rows of Llama 3's 128,256 logits were about 1 % of the 2-core Xeon's 8-stream decode
//! step. Here the maximum is found sixteen lanes at a time and then its first position, which
//! gives candle's answer: the first index of the largest value, NaNs skipped (a row that
//! starts with NaN answers 0, as candle's walk does).

use candle_core::{DType, Tensor};

use super::cpu_features::with_avx2;
use super::cpu_slice::with_f32;
use super::error::Result;

/// Lanes the maximum is kept in.
const LANES: usize = 16;

/// `[rows, cols]` f32 logits to `[rows, 1]` u32 indices, as `logits.argmax_keepdim(1)`.
pub(super) fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let (rows, cols) = logits.dims2()?;
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 || cols == 0 {
        return Ok(logits.argmax_keepdim(1)?);
    }
    let logits = logits.contiguous()?;
    let ids = with_f32(&logits, "argmax", |values| {
        Ok(values
            .chunks_exact(cols)
            .map(first_max)
            .collect::<Vec<u32>>())
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
    let mut lanes = [first; LANES];
    let mut blocks = row.chunks_exact(LANES);
    for block in &mut blocks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(block[i]);
        }
    }
    let top = blocks
        .remainder()
        .iter()
        .copied()
        .fold(lanes.into_iter().fold(first, f32::max), f32::max);
    row.iter().position(|&v| v == top).unwrap_or(0) as u32
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
}
