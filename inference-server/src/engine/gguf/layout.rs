//! llama.cpp's tensor names and its row order for the query and key projections.
//!
//! Hugging Face's rotary embedding pairs dimension `i` of a head with dimension `i + d/2`;
//! llama.cpp's pairs `2i` with `2i + 1`. Its converter (`convert_hf_to_gguf.py`, `permute`)
//! therefore reorders the rows of each head of `q_proj` and `k_proj`: Hugging Face row
//! `j * d/2 + i` becomes GGUF row `2i + j`. Attention scores are unchanged by the reorder as long
//! as the rotation follows it, so restoring the Hugging Face order at load time lets one forward
//! pass serve both formats.

use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::error::{EngineError, Result};

/// The token embedding table, `[vocab, hidden]`.
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// The final RMSNorm weight.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// The output projection; absent when it is tied to the embeddings.
pub const OUTPUT: &str = "output.weight";
/// One divisor per rotary frequency (Llama 3 rope scaling); absent without scaling.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The llama.cpp name of a tensor of block `layer`, e.g. `blk.0.attn_q.weight`.
pub fn block_tensor(layer: usize, part: &str) -> String {
    format!("blk.{layer}.{part}.weight")
}

/// The Hugging Face → llama.cpp pairs of per-layer tensor names, in llama.cpp's spelling
/// (`attn_q` is `self_attn.q_proj`, `ffn_norm` is `post_attention_layernorm`, …).
pub const BLOCK_PARTS: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Where GGUF row `r` of one head comes from in the Hugging Face order: the inverse of the
/// converter's permutation, for a head of `head_dim` rows.
fn hf_row_of_gguf_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    (r % 2) * half + r / 2
}

/// Reorders the rows of a dense `[heads * head_dim, in]` Hugging Face `q_proj`/`k_proj` weight
/// into llama.cpp's order, exactly as the converter's `permute` does.
pub fn to_gguf_rows(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let head_dim = check_heads(rows, heads)?;
    Ok(weight
        .reshape((heads, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// Restores the Hugging Face row order of a llama.cpp `attn_q`/`attn_k` tensor, of any storage
/// type, by moving whole rows of its bytes (quantization blocks never span two rows). The result
/// is placed on `device`.
pub fn to_hf_rows(weight: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, _) = weight.shape().dims2()?;
    let head_dim = check_heads(rows, heads)?;
    let data = weight.data()?;
    let row_bytes = data.len() / rows;
    let mut reordered = vec![0u8; data.len()];
    for head in 0..heads {
        for r in 0..head_dim {
            let from = (head * head_dim + r) * row_bytes;
            let to = (head * head_dim + hf_row_of_gguf_row(r, head_dim)) * row_bytes;
            reordered[to..to + row_bytes].copy_from_slice(&data[from..from + row_bytes]);
        }
    }
    let storage = QStorage::from_data(Cow::Owned(reordered), device, weight.dtype())?;
    Ok(QTensor::new(storage, weight.shape().clone())?)
}

/// The rows of one head, which must be a positive even number.
fn check_heads(rows: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(EngineError::InvalidInput(format!(
            "{rows} projection rows do not split into {heads} heads of an even size"
        )));
    }
    Ok(rows / heads)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;

    /// A `[rows, cols]` matrix whose every value names its row: row `r` holds `r` everywhere.
    fn rows_named(rows: usize, cols: usize) -> Result<Tensor> {
        let values: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
    }

    /// The row names, rounded: Q8_0 stores a constant block as 127 steps of an f16 scale.
    fn row_ids(t: &Tensor) -> Result<Vec<f32>> {
        let ids: Vec<f32> = t.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        Ok(ids.into_iter().map(f32::round).collect())
    }

    #[test]
    fn converter_permutation_interleaves_the_halves_of_each_head() -> Result<()> {
        // Two heads of 6 rows: the first half (0, 1, 2) pairs with the second (3, 4, 5).
        let gguf = to_gguf_rows(&rows_named(12, 32)?, 2)?;
        assert_eq!(
            row_ids(&gguf)?,
            [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]
        );
        Ok(())
    }

    #[test]
    fn row_restoration_inverts_the_permutation_for_quantized_tensors() -> Result<()> {
        let hf = rows_named(16, 64)?;
        let gguf = to_gguf_rows(&hf, 2)?;
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&gguf, dtype)?;
            let back = to_hf_rows(&q, 2, &Device::Cpu)?;
            assert_eq!(back.dtype(), dtype);
            let back = back.dequantize(&Device::Cpu)?;
            assert_eq!(row_ids(&back)?, row_ids(&hf)?, "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn odd_heads_are_an_error() {
        let weight = QTensor::quantize(&rows_named(6, 32).expect("t"), GgmlDType::F32).expect("q");
        assert!(to_hf_rows(&weight, 2, &Device::Cpu).is_err());
        assert!(to_hf_rows(&weight, 0, &Device::Cpu).is_err());
    }
}
