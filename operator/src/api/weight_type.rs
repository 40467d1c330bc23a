//! The storage type of a GGUF file's weights (`spec.source.quantization`), which sizes the GPU
//! memory the weights take.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A GGUF file's weight type, named as llama.cpp's `llama-quantize` and the files' names call
/// it (e.g. `Llama-3.1-8B-Instruct-Q4_K_M.gguf`): F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S,
/// Q4_K_M, Q4_K_S, Q4_0, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K. The server keeps block-quantized
/// weights quantized in GPU memory, so the type decides how much memory the weights take and
/// which instance types they fit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum WeightType {
    #[serde(rename = "F16")]
    F16,
    #[serde(rename = "BF16")]
    Bf16,
    #[serde(rename = "Q8_0")]
    Q8_0,
    #[serde(rename = "Q6_K")]
    Q6K,
    #[serde(rename = "Q5_K_M")]
    Q5KM,
    #[serde(rename = "Q5_K_S")]
    Q5KS,
    #[serde(rename = "Q4_K_M")]
    Q4KM,
    #[serde(rename = "Q4_K_S")]
    Q4KS,
    #[serde(rename = "Q4_0")]
    Q4_0,
    #[serde(rename = "Q3_K_L")]
    Q3KL,
    #[serde(rename = "Q3_K_M")]
    Q3KM,
    #[serde(rename = "Q3_K_S")]
    Q3KS,
    #[serde(rename = "Q2_K")]
    Q2K,
}

impl WeightType {
    /// Every type, in the order of the schema's enum.
    pub const ALL: [WeightType; 13] = [
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q6K,
        Self::Q5KM,
        Self::Q5KS,
        Self::Q4KM,
        Self::Q4KS,
        Self::Q4_0,
        Self::Q3KL,
        Self::Q3KM,
        Self::Q3KS,
        Self::Q2K,
    ];

    /// The name llama.cpp and file names use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q6K => "Q6_K",
            Self::Q5KM => "Q5_K_M",
            Self::Q5KS => "Q5_K_S",
            Self::Q4KM => "Q4_K_M",
            Self::Q4KS => "Q4_K_S",
            Self::Q4_0 => "Q4_0",
            Self::Q3KL => "Q3_K_L",
            Self::Q3KM => "Q3_K_M",
            Self::Q3KS => "Q3_K_S",
            Self::Q2K => "Q2_K",
        }
    }

    /// File bits per model parameter, an upper estimate for the Llama 3.x models.
    ///
    /// A type's name gives the bulk of the matrices (Q4_K: 4.5 bits a value with its scales,
    /// Q8_0: 8.5); llama.cpp's mixes keep some at more bits: the output projection (the tied
    /// embedding in 1B and 3B) at Q6_K, and the `_M`, `_L` types part of the value, output and
    /// down projections a step or two up. The 128,256-token embedding is the largest share in
    /// the smallest model (21 % of the 1B's parameters), so the 1B files have the most bits a
    /// parameter: the 1B files `generate-model --gguf` writes as llama.cpp does take 8.55
    /// (Q8_0) and 5.23 (Q4_K_M); the 8B's published files about 8.5 and 4.9. The figures here
    /// are at or above the 1B's, so the estimate errs on the side of more memory.
    pub fn bits_per_parameter(self) -> f64 {
        match self {
            Self::F16 | Self::Bf16 => 16.0,
            Self::Q8_0 => 8.6,
            Self::Q6K => 6.7,
            Self::Q5KM => 6.0,
            Self::Q5KS => 5.8,
            Self::Q4KM => 5.3,
            Self::Q4KS => 5.1,
            Self::Q4_0 => 5.0,
            Self::Q3KL => 4.8,
            Self::Q3KM => 4.6,
            Self::Q3KS => 4.3,
            Self::Q2K => 3.9,
        }
    }

    /// Whether the weights are 16-bit floats (the catalog's own sizing).
    pub fn is_16_bit(self) -> bool {
        matches!(self, Self::F16 | Self::Bf16)
    }

    /// The type a file name names: a word of the last path segment, split at `-`, `.` and
    /// spaces (`Llama-3.2-1B-Instruct-Q4_K_M.gguf`, `llama-2-7b.q8_0.gguf`), compared without
    /// case; `fp16` counts as F16. With several, the last one.
    pub fn named_in(file_name: &str) -> Option<WeightType> {
        let name = file_name.rsplit('/').next().unwrap_or(file_name);
        name.rsplit(['-', '.', ' ']).find_map(|word| {
            if word.eq_ignore_ascii_case("fp16") {
                return Some(Self::F16);
            }
            Self::ALL
                .into_iter()
                .find(|t| t.name().eq_ignore_ascii_case(word))
        })
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_the_schema_lists_them_all() {
        for t in WeightType::ALL {
            let yaml = serde_yaml::to_string(&t).expect("serialize");
            assert_eq!(yaml.trim(), t.name());
            let back: WeightType = serde_yaml::from_str(t.name()).expect("deserialize");
            assert_eq!(back, t);
        }
        let schema = serde_json::to_value(schemars::schema_for!(WeightType)).expect("schema");
        let listed: Vec<&str> = schema["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let all: Vec<&str> = WeightType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(listed, all);
    }

    #[test]
    fn file_names_name_their_type() {
        let cases = [
            ("Llama-3.1-8B-Instruct-Q4_K_M.gguf", Some(WeightType::Q4KM)),
            ("llama-3.2-1b-instruct-q8_0.gguf", Some(WeightType::Q8_0)),
            ("llama-2-7b.Q5_K_S.gguf", Some(WeightType::Q5KS)),
            (
                "models/70b/Meta-Llama-3.1-70B-Instruct-Q2_K.gguf",
                Some(WeightType::Q2K),
            ),
            ("model-f16.gguf", Some(WeightType::F16)),
            ("Llama-3.2-3B-Instruct-fp16.gguf", Some(WeightType::F16)),
            ("Llama-3.2-3B-Instruct-BF16.gguf", Some(WeightType::Bf16)),
            // Types this list does not hold, and names without a type, name none.
            ("Llama-3.2-1B-Instruct-Q6_K_L.gguf", None),
            ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", None),
            ("model.gguf", None),
            ("q4_k_m/model.gguf", None),
        ];
        for (name, want) in cases {
            assert_eq!(WeightType::named_in(name), want, "{name}");
        }
    }

    #[test]
    fn every_quantized_type_is_smaller_than_the_one_above_it() {
        let bits: Vec<f64> = WeightType::ALL[1..]
            .iter()
            .map(|t| t.bits_per_parameter())
            .collect();
        assert!(bits.windows(2).all(|w| w[0] > w[1]), "{bits:?}");
    }
}
