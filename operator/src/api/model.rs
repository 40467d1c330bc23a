//! The catalog of Meta Llama models a `LlamaDeployment` can serve.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A Meta Llama model from the catalog, named as in the Azure AI Foundry model catalog.
///
/// One of: Meta-Llama-3.2-1B, Meta-Llama-3.2-3B, Meta-Llama-3.2-1B-Instruct,
/// Meta-Llama-3.2-3B-Instruct, Llama-Guard-3-1B, Llama-Guard-3-11B-Vision,
/// Llama-3.2-11B-Vision-Instruct, Llama-3.2-90B-Vision-Instruct, Meta-Llama-3.1-8B-Instruct,
/// Meta-Llama-3.1-70B-Instruct, Meta-Llama-3.1-405B-Instruct. The model decides the default
/// instance type, the GPUs per instance and the GPU memory that must be available.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum ModelName {
    #[serde(rename = "Meta-Llama-3.2-1B")]
    Llama32_1B,
    #[serde(rename = "Meta-Llama-3.2-3B")]
    Llama32_3B,
    #[serde(rename = "Meta-Llama-3.2-1B-Instruct")]
    Llama32_1BInstruct,
    #[serde(rename = "Meta-Llama-3.2-3B-Instruct")]
    Llama32_3BInstruct,
    #[serde(rename = "Llama-Guard-3-1B")]
    LlamaGuard3_1B,
    #[serde(rename = "Llama-Guard-3-11B-Vision")]
    LlamaGuard3_11BVision,
    #[serde(rename = "Llama-3.2-11B-Vision-Instruct")]
    Llama32_11BVisionInstruct,
    #[serde(rename = "Llama-3.2-90B-Vision-Instruct")]
    Llama32_90BVisionInstruct,
    #[serde(rename = "Meta-Llama-3.1-8B-Instruct")]
    Llama31_8BInstruct,
    #[serde(rename = "Meta-Llama-3.1-70B-Instruct")]
    Llama31_70BInstruct,
    #[serde(rename = "Meta-Llama-3.1-405B-Instruct")]
    Llama31_405BInstruct,
}

impl ModelName {
    /// Every catalog model, in catalog order.
    pub const ALL: [ModelName; 11] = [
        ModelName::Llama32_1B,
        ModelName::Llama32_3B,
        ModelName::Llama32_1BInstruct,
        ModelName::Llama32_3BInstruct,
        ModelName::LlamaGuard3_1B,
        ModelName::LlamaGuard3_11BVision,
        ModelName::Llama32_11BVisionInstruct,
        ModelName::Llama32_90BVisionInstruct,
        ModelName::Llama31_8BInstruct,
        ModelName::Llama31_70BInstruct,
        ModelName::Llama31_405BInstruct,
    ];

    /// The catalog name, exactly as written in a manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelName::Llama32_1B => "Meta-Llama-3.2-1B",
            ModelName::Llama32_3B => "Meta-Llama-3.2-3B",
            ModelName::Llama32_1BInstruct => "Meta-Llama-3.2-1B-Instruct",
            ModelName::Llama32_3BInstruct => "Meta-Llama-3.2-3B-Instruct",
            ModelName::LlamaGuard3_1B => "Llama-Guard-3-1B",
            ModelName::LlamaGuard3_11BVision => "Llama-Guard-3-11B-Vision",
            ModelName::Llama32_11BVisionInstruct => "Llama-3.2-11B-Vision-Instruct",
            ModelName::Llama32_90BVisionInstruct => "Llama-3.2-90B-Vision-Instruct",
            ModelName::Llama31_8BInstruct => "Meta-Llama-3.1-8B-Instruct",
            ModelName::Llama31_70BInstruct => "Meta-Llama-3.1-70B-Instruct",
            ModelName::Llama31_405BInstruct => "Meta-Llama-3.1-405B-Instruct",
        }
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_match_catalog_names() {
        for model in ModelName::ALL {
            let json = serde_json::to_value(model).expect("serialize");
            assert_eq!(json, serde_json::Value::String(model.as_str().to_owned()));
            let back: ModelName = serde_json::from_value(json).expect("deserialize");
            assert_eq!(back, model);
        }
    }
}
