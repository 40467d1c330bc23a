//! Which weight type a spec's source holds, and where that was read: it sizes the GPU memory
//! the weights take (see `ModelInfo::with_weights`). Pure.

use crate::api::{SourceSpec, SourceType, WeightFormat, WeightType};

/// The weight type a deployment's instances load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    /// The type the memory estimate counts.
    pub weight_type: WeightType,
    /// Where it was read: a spec field, or `assumed` where nothing names it.
    pub from: WeightsFrom,
}

/// Where a deployment's weight type comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFrom {
    /// `spec.source.format: safetensors` (Llama's published weights are bf16) or a demo model.
    Format,
    /// `spec.source.quantization`.
    Quantization,
    /// The file name in `spec.source.url`.
    Url,
    /// The file name in `spec.source.pvc.path`.
    PvcPath,
    /// A GGUF file whose type nothing names: sized as 16-bit, the most it can take.
    Assumed,
}

impl WeightsFrom {
    /// How status and messages say it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Format => "spec.source.format",
            Self::Quantization => "spec.source.quantization",
            Self::Url => "the file name in spec.source.url",
            Self::PvcPath => "the file name in spec.source.pvc.path",
            Self::Assumed => "assumed: set spec.source.quantization",
        }
    }
}

impl std::fmt::Display for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.weight_type, self.from.describe())
    }
}

/// The weight type of `source`: `quantization` when set, else the type the GGUF file's name
/// names, else 16-bit.
pub fn weights_of(source: &SourceSpec) -> Weights {
    let found = |weight_type, from| Weights { weight_type, from };
    if source.format == WeightFormat::Safetensors || source.type_ == SourceType::Demo {
        return found(WeightType::Bf16, WeightsFrom::Format);
    }
    if let Some(t) = source.quantization {
        return found(t, WeightsFrom::Quantization);
    }
    let named = match source.type_ {
        SourceType::Url => source
            .url
            .as_deref()
            .map(|url| url.split(['?', '#']).next().unwrap_or(url))
            .and_then(WeightType::named_in)
            .map(|t| found(t, WeightsFrom::Url)),
        SourceType::Pvc => source
            .pvc
            .as_ref()
            .and_then(|p| p.path.as_deref())
            .and_then(WeightType::named_in)
            .map(|t| found(t, WeightsFrom::PvcPath)),
        SourceType::HuggingFace | SourceType::Demo => None,
    };
    named.unwrap_or(found(WeightType::F16, WeightsFrom::Assumed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(yaml: &str) -> SourceSpec {
        serde_yaml::from_str(yaml).expect("source spec")
    }

    #[test]
    fn the_type_comes_from_the_field_then_the_file_name_then_sixteen_bits() {
        let cases = [
            (
                "{type: huggingFace, huggingFace: {repository: meta-llama/Llama-3.1-8B-Instruct}}",
                WeightType::Bf16,
                WeightsFrom::Format,
            ),
            ("{type: demo}", WeightType::Bf16, WeightsFrom::Format),
            (
                "{type: url, format: gguf, url: 'https://m.example/Llama-3.1-70B-Instruct-Q4_K_M.gguf?download=true'}",
                WeightType::Q4KM,
                WeightsFrom::Url,
            ),
            (
                // The field wins over the name.
                "{type: url, format: gguf, quantization: Q8_0, url: 'https://m.example/x-Q4_K_M.gguf'}",
                WeightType::Q8_0,
                WeightsFrom::Quantization,
            ),
            (
                "{type: pvc, format: gguf, pvc: {claimName: w, path: llama/llama-3.1-8b.q6_k.gguf}}",
                WeightType::Q6K,
                WeightsFrom::PvcPath,
            ),
            (
                "{type: pvc, format: gguf, pvc: {claimName: w, path: model.gguf}}",
                WeightType::F16,
                WeightsFrom::Assumed,
            ),
            (
                "{type: huggingFace, format: gguf, huggingFace: {repository: bartowski/Llama-3.2-1B-Instruct-GGUF}}",
                WeightType::F16,
                WeightsFrom::Assumed,
            ),
            (
                "{type: huggingFace, format: gguf, quantization: Q4_K_S, huggingFace: {repository: a/b}}",
                WeightType::Q4KS,
                WeightsFrom::Quantization,
            ),
            (
                // A query string is not part of the file name.
                "{type: url, format: gguf, url: 'https://m.example/model.gguf?type=Q4_K_M'}",
                WeightType::F16,
                WeightsFrom::Assumed,
            ),
        ];
        for (yaml, weight_type, from) in cases {
            assert_eq!(
                weights_of(&source(yaml)),
                Weights { weight_type, from },
                "{yaml}"
            );
        }
    }

    #[test]
    fn status_says_the_type_and_where_it_was_read() {
        let w = weights_of(&source(
            "{type: url, format: gguf, url: 'https://m.example/Llama-3.2-1B-Q8_0.gguf'}",
        ));
        assert_eq!(w.to_string(), "Q8_0 (the file name in spec.source.url)");
    }
}
