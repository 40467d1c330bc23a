//! The MLP's gate, `silu(gate) × up`, on the CPU in one pass on the engine's CPU pool
//! ([`super::cpu_pool`]).
//!
//! Through candle it is two operations, each allocating its output; from 64 Ki elements (eight
//! decoding sequences of a 1B model: 8 × 8,192) each runs on candle's own barrier pool,
//! whose thread is woken for it and then spins beside the engine's helper on the same two
//! cores. In the 2-core Xeon's 8-stream decode step that pool took about 6 % of the samples.
//! The arithmetic is candle's, `v / (1 + e^(-v))` then the product, so the result is the same
//! to the bit.

use candle_core::{DType, Tensor};

use super::cpu_pool::for_each_chunk;
use super::cpu_slice::with_f32;
use super::error::Result;

/// Elements a task takes.
const CHUNK: usize = 16 * 1024;
/// How errors name this kernel.
const KERNEL: &str = "swiglu";

/// `silu(gate) * up`, elementwise, for tensors of one shape.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims();
    if !fused {
        return Ok((candle_nn::ops::silu(gate)? * up)?);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let mut out = vec![0f32; gate.elem_count()];
    with_f32(&gate, KERNEL, |gate| {
        with_f32(&up, KERNEL, |up| {
            for_each_chunk(&mut out, CHUNK, |task, dst| {
                let (gate, up) = (&gate[task * CHUNK..], &up[task * CHUNK..]);
                for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
            Ok(())
        })
    })?;
    Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_candles_silu_times_up_to_the_bit() -> Result<()> {
        // Three tasks' worth and a tail; values across silu's range, infinities included.
        let (rows, cols) = (183, 181);
        let n = rows * cols;
        assert!(n > 2 * CHUNK && n % CHUNK != 0);
        let gate: Vec<f32> = (0..n)
            .map(|i| match i {
                5 => f32::INFINITY,
                6 => f32::NEG_INFINITY,
                _ => (i as f32 * 0.37).sin() * 12.0,
            })
            .collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let gate = Tensor::from_vec(gate, (rows, cols), &Device::Cpu)?;
        let up = Tensor::from_vec(up, (rows, cols), &Device::Cpu)?;
        let bits = |t: Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        let got = bits(swiglu(&gate, &up)?)?;
        let want = bits((candle_nn::ops::silu(&gate)? * &up)?)?;
        assert_eq!(got.len(), n);
        assert!(got == want, "differs from candle");
        // -inf gives NaN (-inf / inf), as through candle.
        assert!(f32::from_bits(got[6]).is_nan());
        // A strided gate is read through a copy; other dtypes go through candle.
        let strided = bits(swiglu(&gate.t()?, &up.t()?)?)?;
        assert!(strided == bits((candle_nn::ops::silu(&gate.t()?)? * up.t()?)?)?);
        let half = swiglu(&gate.to_dtype(DType::F16)?, &up.to_dtype(DType::F16)?)?;
        assert_eq!(half.dtype(), DType::F16);
        Ok(())
    }
}
