//! The model catalog: size, context and GPU needs of every model the API names.

use crate::api::{ModelName, WeightType};
use serde::{Deserialize, Serialize};

/// Text-only or vision (image and text in).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Architecture {
    Text,
    Vision,
}

/// What the operator needs to know about a model to place it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    /// The catalog name.
    pub name: ModelName,
    /// Parameters, in billions.
    pub parameters_billion: f64,
    /// Maximum context length in tokens.
    pub context_length: u32,
    /// Text or vision.
    pub architecture: Architecture,
    /// Size of the weights in GB (10^9 bytes): bf16 in the catalog, the deployment's weight
    /// type once [`ModelInfo::with_weights`] has applied it.
    pub weights_gb: f64,
    /// GPU memory needed in GiB: weights plus headroom for the KV cache and activations.
    pub gpu_memory_gib: u32,
    /// GPUs an instance needs on the default instance type (the server splits the model's
    /// layers over an instance's GPUs).
    pub gpus_per_instance: u32,
    /// The instance type used when `spec.compute.instanceType` is unset.
    pub default_instance_type: String,
    /// Bytes of key/value cache per token at 16 bits: keys and values of every layer
    /// (2 × layers × key/value heads × head dimension × 2). The operator sizes each instance's
    /// cache budget with it. Unset: the budget is not checked against GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes_per_token: Option<u64>,
}

impl ModelInfo {
    /// The weights' size in GiB.
    pub fn weights_gib(&self) -> f64 {
        self.weights_gb * 1e9 / f64::from(1u32 << 30)
    }

    /// This model with weights of `weight_type` in place of the catalog's 16-bit ones.
    ///
    /// Quantized weights take `bits_per_parameter` a parameter; they need as many GPUs as
    /// their memory takes on GPUs of `largest_gpu_gib` each (at least one, at most the
    /// catalog's count). 16-bit weights keep the catalog's figures and GPU count.
    pub fn with_weights(&self, weight_type: WeightType, largest_gpu_gib: u32) -> ModelInfo {
        if weight_type.is_16_bit() {
            return self.clone();
        }
        let weights_gb = self.parameters_billion * weight_type.bits_per_parameter() / 8.0;
        let gpu_memory_gib = with_headroom(weights_gb);
        let gpus = gpu_memory_gib.div_ceil(largest_gpu_gib.max(1));
        ModelInfo {
            weights_gb,
            gpu_memory_gib,
            gpus_per_instance: gpus.clamp(1, self.gpus_per_instance.max(1)),
            ..self.clone()
        }
    }
}

/// GPU memory for `weights_gb` of weights plus 20 % headroom, in GiB, rounded up.
fn with_headroom(weights_gb: f64) -> u32 {
    let gib = weights_gb * 1e9 / f64::from(1u32 << 30) * 1.2;
    gib.ceil() as u32
}

/// The built-in catalog.
pub fn default_models() -> Vec<ModelInfo> {
    use Architecture::{Text, Vision};
    use ModelName::*;
    // Keys and values of every layer at 16 bits: 2 × layers × 8 key/value heads × head
    // dimension × 2 bytes.
    let kv = |layers: u64, head_dim: u64| 2 * layers * 8 * head_dim * 2;
    let m = |name, params: f64, ctx, arch, gpus, instance: &str, kv_bytes| {
        let weights_gb = params * 2.0;
        ModelInfo {
            name,
            parameters_billion: params,
            context_length: ctx,
            architecture: arch,
            weights_gb,
            gpu_memory_gib: with_headroom(weights_gb),
            gpus_per_instance: gpus,
            default_instance_type: instance.into(),
            kv_bytes_per_token: Some(kv_bytes),
        }
    };
    let nc24 = "Standard_NC24ads_A100_v4";
    let nc96 = "Standard_NC96ads_A100_v4";
    // The vision models count their cross-attention layers too (8 of 40, 20 of 100), which
    // cache image tokens rather than text ones: an overestimate, on the safe side. Llama Guard 3
    // 1B is taken at the 3.2 1B's 16 layers, also on the safe side.
    vec![
        m(Llama32_1B, 1.24, 131_072, Text, 1, nc24, kv(16, 64)),
        m(Llama32_3B, 3.21, 131_072, Text, 1, nc24, kv(28, 128)),
        m(Llama32_1BInstruct, 1.24, 131_072, Text, 1, nc24, kv(16, 64)),
        m(
            Llama32_3BInstruct,
            3.21,
            131_072,
            Text,
            1,
            nc24,
            kv(28, 128),
        ),
        m(LlamaGuard3_1B, 1.50, 131_072, Text, 1, nc24, kv(16, 64)),
        m(
            LlamaGuard3_11BVision,
            10.67,
            131_072,
            Vision,
            1,
            nc24,
            kv(40, 128),
        ),
        m(
            Llama32_11BVisionInstruct,
            10.67,
            131_072,
            Vision,
            1,
            nc24,
            kv(40, 128),
        ),
        m(
            Llama32_90BVisionInstruct,
            88.6,
            131_072,
            Vision,
            4,
            nc96,
            kv(100, 128),
        ),
        m(
            Llama31_8BInstruct,
            8.03,
            131_072,
            Text,
            1,
            nc24,
            kv(32, 128),
        ),
        m(
            Llama31_70BInstruct,
            70.6,
            131_072,
            Text,
            4,
            nc96,
            kv(80, 128),
        ),
        // 812 GB of bf16 weights exceed any single 8-GPU instance: it needs two nodes.
        m(
            Llama31_405BInstruct,
            405.9,
            131_072,
            Text,
            16,
            "Standard_ND96isr_H100_v5",
            kv(126, 128),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::default_instance_types;

    #[test]
    fn every_api_model_is_in_the_catalog() {
        let models = default_models();
        for name in ModelName::ALL {
            assert!(models.iter().any(|m| m.name == name), "{name} missing");
        }
    }

    #[test]
    fn default_instance_types_exist_and_fit_except_405b() {
        let types = default_instance_types();
        for model in default_models() {
            let it = types
                .iter()
                .find(|t| t.name == model.default_instance_type)
                .expect("default instance type in catalog");
            let fits = model.gpu_memory_gib <= it.total_gpu_memory_gib()
                && model.gpus_per_instance <= it.gpu_count;
            assert_eq!(
                fits,
                model.name != ModelName::Llama31_405BInstruct,
                "{}",
                model.name
            );
        }
    }

    #[test]
    fn quantized_weights_take_their_bits_and_need_fewer_gpus() {
        let model = |name| {
            default_models()
                .into_iter()
                .find(|m| m.name == name)
                .expect("catalog model")
        };
        let seventy = model(ModelName::Llama31_70BInstruct);
        // 70.6 B × 5.3 bits = 46.8 GB = 43.56 GiB, × 1.2 = 52.3 → 53 GiB: one 80 GB GPU.
        let q4 = seventy.with_weights(WeightType::Q4KM, 80);
        assert!((q4.weights_gb - 46.7725).abs() < 1e-9, "{}", q4.weights_gb);
        assert_eq!((q4.gpu_memory_gib, q4.gpus_per_instance), (53, 1));
        // 8.6 bits: 75.9 GB → 85 GiB with headroom, more than one 80 GB GPU holds.
        let q8 = seventy.with_weights(WeightType::Q8_0, 80);
        assert_eq!((q8.gpu_memory_gib, q8.gpus_per_instance), (85, 2));
        // 16-bit files keep the catalog's sizing, GPU count included.
        assert_eq!(seventy.with_weights(WeightType::F16, 80), seventy);
        // 405 B at Q4_K_M: 269 GB, 301 GiB: four 80 GB GPUs, one node.
        let big = model(ModelName::Llama31_405BInstruct).with_weights(WeightType::Q4KM, 80);
        assert_eq!((big.gpu_memory_gib, big.gpus_per_instance), (301, 4));
    }

    #[test]
    fn estimates_are_not_below_the_files_generate_model_writes() {
        // The 1B files of `generate-model --shape llama-3.2-1b --gguf` (the benchmark's,
        // docs/benchmarks/engine-vs-llama-cpp.md): 1,321 MB at Q8_0 and 808 MB at Q4_K_M, for
        // the shape's 1.236 B parameters.
        for (t, file_mb) in [(WeightType::Q8_0, 1321.0), (WeightType::Q4KM, 808.0)] {
            let estimate_mb = 1.236e3 * t.bits_per_parameter() / 8.0;
            assert!(estimate_mb >= file_mb, "{t}: {estimate_mb} < {file_mb}");
            assert!(
                estimate_mb < file_mb * 1.05,
                "{t}: {estimate_mb} too far above"
            );
        }
    }

    #[test]
    fn headroom_is_twenty_percent_over_the_weights() {
        // 8.03 B params → 16.06 GB → 14.96 GiB → × 1.2 = 17.95 → 18 GiB.
        let m = default_models()
            .into_iter()
            .find(|m| m.name == ModelName::Llama31_8BInstruct);
        assert_eq!(m.map(|m| m.gpu_memory_gib), Some(18));
    }
}
