//! Which storage type each tensor gets in a GGUF file of a given file type, following llama.cpp:
//! `convert_hf_to_gguf.py --outtype f16|q8_0` and `llama-quantize … Q4_K_M`
//! (`llama_tensor_get_type` in `src/llama-quant.cpp`).

use candle_core::quantized::GgmlDType;

use super::GgufFileType;

/// What a tensor is, as far as the type choice cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A 1-D tensor (norm weights, `rope_freqs`): always F32.
    Vector,
    /// `token_embd.weight`; `tied` when it is also the output projection.
    TokenEmbedding { tied: bool },
    /// `output.weight`.
    Output,
    /// `blk.N.attn_v.weight`.
    AttentionValue { layer: usize, layers: usize },
    /// `blk.N.ffn_down.weight`.
    FeedForwardDown { layer: usize, layers: usize },
    /// Every other matrix.
    Matrix,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer between, get more bits in Q4_K_M.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8
        || layer >= 7 * layers / 8
        || (layer as isize - (layers / 8) as isize) % 3 == 2
}

/// The storage type of a tensor of `role` whose rows hold `row_len` values.
pub fn tensor_type(file_type: GgufFileType, role: TensorRole, row_len: usize) -> GgmlDType {
    if role == TensorRole::Vector {
        return GgmlDType::F32;
    }
    let wanted = match file_type {
        GgufFileType::F16 => GgmlDType::F16,
        GgufFileType::Q8_0 => GgmlDType::Q8_0,
        GgufFileType::Q4KM => q4_k_m_type(role, row_len),
    };
    fallback(wanted, row_len)
}

fn q4_k_m_type(role: TensorRole, row_len: usize) -> GgmlDType {
    match role {
        // The output projection (or the embeddings that stand in for it) is the most sensitive:
        // Q6_K, or Q8_0 when its rows do not split into 256-value blocks.
        TensorRole::Output | TensorRole::TokenEmbedding { tied: true } => {
            if row_len.is_multiple_of(GgmlDType::Q4K.block_size()) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q8_0
            }
        }
        TensorRole::AttentionValue { layer, layers }
        | TensorRole::FeedForwardDown { layer, layers }
            if use_more_bits(layer, layers) =>
        {
            GgmlDType::Q6K
        }
        _ => GgmlDType::Q4K,
    }
}

/// llama.cpp's fallback for rows that do not split into whole blocks: a 32-value block type of
/// similar size, then F16 when even that does not fit.
fn fallback(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    if row_len.is_multiple_of(wanted.block_size()) {
        return wanted;
    }
    let substitute = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if row_len.is_multiple_of(substitute.block_size()) {
        substitute
    } else {
        GgmlDType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp_for_32_layers() {
        let chosen: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        // n/8 = 4 first, from 7n/8 = 28 on, and (i - 4) % 3 == 2 between.
        assert_eq!(
            chosen,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn q4_k_m_mix_on_256_multiples() {
        let t = |role| tensor_type(GgufFileType::Q4KM, role, 4096);
        assert_eq!(t(TensorRole::Matrix), GgmlDType::Q4K);
        assert_eq!(t(TensorRole::Output), GgmlDType::Q6K);
        assert_eq!(t(TensorRole::TokenEmbedding { tied: true }), GgmlDType::Q6K);
        assert_eq!(
            t(TensorRole::TokenEmbedding { tied: false }),
            GgmlDType::Q4K
        );
        let down = |layer| TensorRole::FeedForwardDown { layer, layers: 32 };
        assert_eq!(t(down(0)), GgmlDType::Q6K);
        assert_eq!(t(down(4)), GgmlDType::Q4K);
        let v = |layer| TensorRole::AttentionValue { layer, layers: 32 };
        assert_eq!(t(v(6)), GgmlDType::Q6K);
        assert_eq!(t(v(7)), GgmlDType::Q4K);
        assert_eq!(t(TensorRole::Vector), GgmlDType::F32);
    }

    #[test]
    fn short_rows_fall_back_like_llama_quantize() {
        let t = |role, row| tensor_type(GgufFileType::Q4KM, role, row);
        assert_eq!(t(TensorRole::Matrix, 64), GgmlDType::Q5_0);
        assert_eq!(t(TensorRole::Output, 64), GgmlDType::Q8_0);
        // Of 2 layers, only the last gets more bits: Q6_K → Q8_0, Q4_K → Q5_0 on 128-value rows.
        let down = |layer| TensorRole::FeedForwardDown { layer, layers: 2 };
        assert_eq!(t(down(1), 128), GgmlDType::Q8_0);
        assert_eq!(t(down(0), 128), GgmlDType::Q5_0);
        assert_eq!(t(TensorRole::Matrix, 48), GgmlDType::F16);
        assert_eq!(
            tensor_type(GgufFileType::Q8_0, TensorRole::Matrix, 48),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type(GgufFileType::Q8_0, TensorRole::Output, 64),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type(GgufFileType::F16, TensorRole::Matrix, 48),
            GgmlDType::F16
        );
    }
}
