//! Rotary position embeddings with the Llama 3 frequency scaling.
//!
//! Each token carries its own position, so sequences of different lengths can share one
//! forward pass: cos/sin are computed for exactly the positions in the batch.

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::error::{EngineError, Result};

/// The inverse frequencies of one attention head, after Llama 3 scaling.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Shape `[1, head_dim / 2]`, f32.
    inv_freq: Tensor,
}

/// Inverse frequencies `theta^(-2i/d)` for `i < d/2`, scaled as Hugging Face's
/// `_compute_llama3_parameters` does: long wavelengths are divided by `factor`, short ones kept,
/// and the band between is interpolated smoothly. Computed in f32 like the reference.
pub fn inverse_frequencies(config: &LlamaConfig) -> Vec<f32> {
    let dim = config.head_dim();
    let base = config.rope_theta as f32;
    let plain = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32));
    let Some(scaling) = &config.rope_scaling else {
        return plain.collect();
    };
    let factor = scaling.factor as f32;
    let low = scaling.low_freq_factor as f32;
    let high = scaling.high_freq_factor as f32;
    let old_context = scaling.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_context / low;
    let high_freq_wavelen = old_context / high;
    plain
        .map(|freq| {
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

impl Rope {
    /// Prepares the frequencies for `config` on `device`.
    pub fn new(config: &LlamaConfig, device: &Device) -> Result<Self> {
        let freqs = inverse_frequencies(config);
        let half = freqs.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(freqs, (1, half), device)?,
        })
    }

    /// Prepares frequencies divided by per-dimension factors, the way llama.cpp applies the
    /// `rope_freqs.weight` tensor of a GGUF file (`theta_i / factor_i`). Its converter stores the
    /// Llama 3 scaling there, so this reproduces [`inverse_frequencies`] with `rope_scaling` set
    /// (`config` itself must carry no `rope_scaling`, or it would be applied twice).
    pub fn with_frequency_factors(
        config: &LlamaConfig,
        factors: &[f32],
        device: &Device,
    ) -> Result<Self> {
        let plain = inverse_frequencies(config);
        if config.rope_scaling.is_some() || factors.len() != plain.len() {
            return Err(EngineError::InvalidInput(format!(
                "{} rope frequency factors for {} frequencies (with rope_scaling {:?})",
                factors.len(),
                plain.len(),
                config.rope_scaling.as_ref().map(|s| &s.rope_type)
            )));
        }
        let half = plain.len();
        let freqs: Vec<f32> = plain.iter().zip(factors).map(|(f, k)| f / k).collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(freqs, (1, half), device)?,
        })
    }

    /// The inverse frequencies in use, after any scaling (`head_dim / 2` values).
    pub fn frequencies(&self) -> Result<Vec<f32>> {
        Ok(self.inv_freq.flatten_all()?.to_vec1()?)
    }

    /// cos and sin for `positions`, each of shape `[positions.len(), head_dim / 2]` in `dtype`.
    pub fn cos_sin(&self, positions: &[u32], dtype: DType) -> Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let positions: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let count = positions.len();
        let positions = Tensor::from_vec(positions, (count, 1), device)?;
        let angles = positions.broadcast_mul(&self.inv_freq)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x` of shape `[heads, tokens, head_dim]` (contiguous) by the angles of its
    /// tokens, pairing dimension `i` with `i + head_dim/2` (the Hugging Face "rotate half"
    /// layout), in one fused kernel (candle-nn's `rope`).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (heads, tokens, head_dim) = x.dims3()?;
        let x = x.reshape((1, heads, tokens, head_dim))?;
        Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?.reshape((heads, tokens, head_dim))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::RopeScaling;

    fn config(scaling: Option<RopeScaling>) -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": scaling,
        }))
        .expect("config")
    }

    fn llama31_scaling() -> RopeScaling {
        RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    #[test]
    fn scaling_keeps_high_frequencies_divides_low_and_blends_between() {
        let plain = inverse_frequencies(&config(None));
        let scaled = inverse_frequencies(&config(Some(llama31_scaling())));
        assert_eq!(plain.len(), 8);
        for (i, (p, s)) in plain.iter().zip(&scaled).enumerate() {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 2048.0 {
                assert_eq!(p, s, "index {i} is high-frequency and kept");
            } else if wavelen > 8192.0 {
                assert!(
                    (p / 8.0 - s).abs() <= 1e-12,
                    "index {i} is divided by the factor"
                );
            } else {
                assert!(
                    *s < *p && *s > p / 8.0,
                    "index {i} is blended: {s} between {} and {p}",
                    p / 8.0
                );
            }
        }
        // head_dim 16, theta 5e5: the three regimes all occur.
        assert!(plain.iter().zip(&scaled).any(|(p, s)| p == s));
        assert!(
            plain
                .iter()
                .zip(&scaled)
                .any(|(p, s)| (p / 8.0 - s).abs() <= 1e-12)
        );
    }

    /// llama.cpp's converter turns `rope_scaling` into one divisor per frequency; dividing by
    /// them gives back the scaled frequencies (up to f32 rounding of the blended band).
    #[test]
    fn frequency_factors_reproduce_llama3_scaling() -> Result<()> {
        let scaling = llama31_scaling();
        let plain = inverse_frequencies(&config(None));
        let scaled = inverse_frequencies(&config(Some(scaling.clone())));
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        let rope = Rope::with_frequency_factors(&config(None), &factors, &Device::Cpu)?;
        for (a, b) in rope.frequencies()?.iter().zip(&scaled) {
            assert!((a - b).abs() <= b * 1e-6, "{a} vs {b}");
        }
        assert!(Rope::with_frequency_factors(&config(None), &factors[1..], &Device::Cpu).is_err());
        assert!(
            Rope::with_frequency_factors(&config(Some(scaling)), &factors, &Device::Cpu).is_err()
        );
        Ok(())
    }

    #[test]
    fn rotation_at_position_zero_is_identity_and_preserves_norm() -> Result<()> {
        let device = Device::Cpu;
        let rope = Rope::new(&config(Some(llama31_scaling())), &device)?;
        // [heads 4, tokens 2, head_dim 16]: token 0 at position 0, token 1 at 37.
        let x = Tensor::arange(0f32, 4.0 * 2.0 * 16.0, &device)?.reshape((4, 2, 16))?;
        let (cos, sin) = rope.cos_sin(&[0, 37], DType::F32)?;
        let y = Rope::apply(&x, &cos, &sin)?;
        let token =
            |t: &Tensor, i: usize| -> Result<Tensor> { Ok(t.narrow(1, i, 1)?.contiguous()?) };
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        assert_eq!(values(&token(&x, 0)?)?, values(&token(&y, 0)?)?);
        let norm = |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?) };
        let (nx, ny) = (norm(&token(&x, 1)?)?, norm(&token(&y, 1)?)?);
        assert!((nx - ny).abs() / nx < 1e-5, "{nx} vs {ny}");
        // The fused kernel computes the rotate-half formula.
        let (x1, x2) = (x.narrow(2, 0, 8)?, x.narrow(2, 8, 8)?);
        let (c, s) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
        let want = Tensor::cat(
            &[
                (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?,
                (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?,
            ],
            2,
        )?;
        let worst = values(&y)?
            .iter()
            .zip(values(&want)?)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "fused rope differs from the formula by {worst}"
        );
        assert_ne!(values(&token(&x, 1)?)?, values(&token(&y, 1)?)?);
        Ok(())
    }
}
