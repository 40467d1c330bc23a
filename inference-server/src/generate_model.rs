//! `llama-server generate-model`: writes a random-weight Llama model in the Hugging Face layout
//! (`config.json`, `generation_config.json`, `model.safetensors`, tokenizer files), and on request
//! the same model as llama.cpp GGUF files beside it ([`GenerateModel::write_gguf`]).
//!
//! The weights are deterministic for a seed: every tensor draws from its own stream, derived
//! from the seed and the tensor's name, so tests and the Python reference can regenerate the
//! exact same model.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::engine::config::{LlamaConfig, RopeScaling, TokenIds};
use crate::engine::error::{EngineError, Result};
use crate::gguf_export::{GgufFileType, export_gguf};
use crate::rng::SplitMix64;

/// The model shapes `generate-model` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelShape {
    /// 2 layers, hidden 64, tied embeddings, no rope scaling (Llama 3.0 style). Fast tests.
    Tiny,
    /// 3 layers, hidden 64, untied `lm_head`, Llama 3.1 rope scaling. Fast tests.
    TinyUntied,
    /// 2 layers, hidden 256, intermediate 512, untied, Llama 3.1 rope scaling: every matrix row
    /// splits into 256-value blocks, so a Q4_K_M GGUF of it uses real K-quants.
    #[value(name = "tiny-256")]
    Tiny256,
    /// The shape of Llama 3.2 1B (tied embeddings, rope factor 32).
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    /// The shape of Llama 3.1 8B (untied, rope factor 8).
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
}

/// The dtype weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
}

/// Standard deviation of the random matrices; small enough for well-behaved logits.
const WEIGHT_STD: f64 = 0.02;
/// Norm weights are `1 + NORM_JITTER * normal`, so a wrong norm weight shows in the logits.
const NORM_JITTER: f64 = 0.1;
/// The Llama 3 vocabulary, the same as the real tokenizer's.
pub const LLAMA3_VOCAB: usize = 128_256;

impl ModelShape {
    /// The `config.json` of this shape.
    pub fn config(self) -> LlamaConfig {
        let llama31 = |factor: f64| RopeScaling {
            rope_type: "llama3".into(),
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // (hidden, intermediate, layers, heads, kv heads, max positions, tied, scaling)
        let (hidden, inter, layers, heads, kv, max_pos, tied, scaling) = match self {
            Self::Tiny => (64, 128, 2, 4, 2, 8192, true, None),
            Self::TinyUntied => (64, 128, 3, 4, 2, 131_072, false, Some(llama31(8.0))),
            Self::Tiny256 => (256, 512, 2, 4, 2, 131_072, false, Some(llama31(8.0))),
            Self::Llama32_1b => (2048, 8192, 16, 32, 8, 131_072, true, Some(llama31(32.0))),
            Self::Llama31_8b => (4096, 14336, 32, 32, 8, 131_072, false, Some(llama31(8.0))),
        };
        LlamaConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size: LLAMA3_VOCAB,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: Some(hidden / heads),
            max_position_embeddings: max_pos,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: scaling,
            tie_word_embeddings: tied,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(128_000),
            eos_token_id: Some(TokenIds::Many(vec![128_001, 128_008, 128_009])),
            torch_dtype: Some("float32".into()),
        }
    }
}

/// How one tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Init {
    Matrix,
    Norm,
}

/// Every tensor of a Llama checkpoint with the Hugging Face names, in file order.
fn tensor_plan(config: &LlamaConfig) -> Vec<(String, Vec<usize>, Init)> {
    let hidden = config.hidden_size;
    let head_dim = config.head_dim();
    let q = config.num_attention_heads * head_dim;
    let kv = config.kv_heads() * head_dim;
    let inter = config.intermediate_size;
    let mut plan = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![config.vocab_size, hidden],
        Init::Matrix,
    )];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        plan.extend([
            (
                format!("{p}.input_layernorm.weight"),
                vec![hidden],
                Init::Norm,
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, hidden],
                Init::Matrix,
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, hidden],
                Init::Matrix,
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, hidden],
                Init::Matrix,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![hidden, q],
                Init::Matrix,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![hidden],
                Init::Norm,
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![inter, hidden],
                Init::Matrix,
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![inter, hidden],
                Init::Matrix,
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![hidden, inter],
                Init::Matrix,
            ),
        ]);
    }
    plan.push(("model.norm.weight".to_owned(), vec![hidden], Init::Norm));
    if !config.tie_word_embeddings {
        plan.push((
            "lm_head.weight".to_owned(),
            vec![config.vocab_size, hidden],
            Init::Matrix,
        ));
    }
    plan
}

/// The values of one tensor, drawn from its own stream.
fn tensor_values(seed: u64, name: &str, count: usize, init: Init) -> Vec<f32> {
    let mut rng = SplitMix64::for_stream(seed, name);
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        let (a, b) = rng.next_normal_pair();
        values.extend([a, b]);
    }
    values.truncate(count);
    values
        .into_iter()
        .map(|z: f64| match init {
            Init::Matrix => (z * WEIGHT_STD) as f32,
            Init::Norm => (1.0 + z * NORM_JITTER) as f32,
        })
        .collect()
}

/// f32 → bfloat16 bits, rounding to nearest even (as torch does).
fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return 0x7fc0;
    }
    let rounding = ((bits >> 16) & 1) + 0x7fff;
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// What `generate-model` was asked to do.
#[derive(Debug, Clone)]
pub struct GenerateModel {
    pub shape: ModelShape,
    pub seed: u64,
    pub out: PathBuf,
    /// A directory holding `tokenizer.json` and `tokenizer_config.json`.
    pub tokenizer_dir: PathBuf,
    pub dtype: WeightDtype,
}

impl GenerateModel {
    /// Writes the model directory. Existing files of the same names are replaced.
    pub fn run(&self) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| EngineError::Io { path, source }
        };
        std::fs::create_dir_all(&self.out).map_err(io(&self.out))?;
        let mut config = self.shape.config();
        config.torch_dtype = Some(
            match self.dtype {
                WeightDtype::F32 => "float32",
                WeightDtype::Bf16 => "bfloat16",
            }
            .into(),
        );
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            let from = self.tokenizer_dir.join(file);
            std::fs::copy(&from, self.out.join(file)).map_err(io(&from))?;
        }
        write_json(
            &self.out.join("config.json"),
            &serde_json::to_value(&config).map_err(json_err)?,
        )?;
        write_json(
            &self.out.join("generation_config.json"),
            &json!({
                "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id,
                "do_sample": true, "temperature": 0.6, "top_p": 0.9,
            }),
        )?;
        self.write_safetensors(&config, &self.out.join("model.safetensors"))
    }

    /// Writes `model-<type>.gguf` into the output directory from the model [`GenerateModel::run`]
    /// wrote there (the same weights, converted as llama.cpp's tools would, tokenizer included).
    /// Returns the file's path.
    pub fn write_gguf(&self, file_type: GgufFileType) -> Result<PathBuf> {
        let path = self.out.join(file_type.file_name());
        export_gguf(&self.out, file_type, &path)?;
        Ok(path)
    }

    /// Streams the tensors into one safetensors file, one tensor in memory at a time.
    fn write_safetensors(&self, config: &LlamaConfig, path: &Path) -> Result<()> {
        let io = |source| EngineError::Io {
            path: path.to_owned(),
            source,
        };
        let plan = tensor_plan(config);
        let (dtype_name, width) = match self.dtype {
            WeightDtype::F32 => ("F32", 4),
            WeightDtype::Bf16 => ("BF16", 2),
        };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, shape, _) in &plan {
            let bytes = shape.iter().product::<usize>() * width;
            header.insert(
                name.clone(),
                json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let mut header = serde_json::to_vec(&header).map_err(json_err)?;
        // The data must start 8-byte aligned; the format pads the header with spaces.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let mut file = BufWriter::new(File::create(path).map_err(io)?);
        file.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(&header).map_err(io)?;
        for (name, shape, init) in &plan {
            let values = tensor_values(self.seed, name, shape.iter().product(), *init);
            let bytes: Vec<u8> = match self.dtype {
                WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                WeightDtype::Bf16 => values
                    .iter()
                    .flat_map(|v| bf16_bits(*v).to_le_bytes())
                    .collect(),
            };
            file.write_all(&bytes).map_err(io)?;
        }
        file.flush().map_err(io)
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(json_err)?;
    std::fs::write(path, text + "\n").map_err(|source| EngineError::Io {
        path: path.to_owned(),
        source,
    })
}

fn json_err(err: serde_json::Error) -> EngineError {
    EngineError::InvalidInput(format!("cannot serialize JSON: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_valid_configs() {
        for shape in [
            ModelShape::Tiny,
            ModelShape::TinyUntied,
            ModelShape::Tiny256,
            ModelShape::Llama32_1b,
            ModelShape::Llama31_8b,
        ] {
            shape.config().validate().expect("valid");
        }
        assert!(ModelShape::Tiny.config().tie_word_embeddings);
        assert!(!ModelShape::TinyUntied.config().tie_word_embeddings);
        assert!(ModelShape::TinyUntied.config().rope_scaling.is_some());
    }

    #[test]
    fn plan_has_lm_head_only_when_untied() {
        let names = |shape: ModelShape| -> Vec<String> {
            tensor_plan(&shape.config())
                .into_iter()
                .map(|(n, _, _)| n)
                .collect()
        };
        assert!(!names(ModelShape::Tiny).contains(&"lm_head.weight".to_owned()));
        assert!(names(ModelShape::TinyUntied).contains(&"lm_head.weight".to_owned()));
        // embed + 9 per layer + norm (+ lm_head)
        assert_eq!(names(ModelShape::Tiny).len(), 1 + 9 * 2 + 1);
        assert_eq!(names(ModelShape::TinyUntied).len(), 1 + 9 * 3 + 2);
    }

    #[test]
    fn values_are_deterministic_per_seed_and_name() {
        let a = tensor_values(3, "w", 5, Init::Matrix);
        assert_eq!(a, tensor_values(3, "w", 5, Init::Matrix));
        assert_ne!(a, tensor_values(4, "w", 5, Init::Matrix));
        assert_ne!(a, tensor_values(3, "v", 5, Init::Matrix));
        assert!(a.iter().all(|v| v.abs() < 0.2));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(-2.0), 0xc000);
        // 1 + 2^-8 is exactly between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
    }
}
