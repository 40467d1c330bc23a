//! Llama models in llama.cpp's GGUF format.
//!
//! A GGUF file carries the configuration as `llama.*` metadata keys and the weights under
//! llama.cpp's names (`token_embd.weight`, `blk.N.attn_q.weight`, …). Two things differ from the
//! Hugging Face layout and are undone at load time, so the forward pass is the same code for both
//! formats:
//!
//! - llama.cpp's converter reorders the rows of every head of `attn_q` and `attn_k` for its
//!   interleaved rotary layout ([`layout`]); the loader restores the Hugging Face order by moving
//!   whole rows, which works on quantized blocks too (a block never crosses a row).
//! - Llama 3 rope scaling is not a metadata key: the converter stores one divisor per rotary
//!   frequency as the `rope_freqs.weight` tensor, which the loader applies to the frequencies.
//!
//! Block-quantized matrices (Q8_0, Q4_K, Q6_K, …) stay quantized in memory and are multiplied by
//! candle's quantized kernels; float matrices (F16, BF16, F32) are expanded to the compute dtype.

mod file;
mod file_type;
pub mod layout;
mod load;
mod metadata;
mod tokenizer;

pub use file::{GgufFile, split_prefix};
pub use file_type::{FILE_TYPE_KEY, check_file_type, file_type, file_type_name};
pub use metadata::llama_config;
pub use tokenizer::{GgufTokenizer, embedded_tokenizer, has_tokenizer};
