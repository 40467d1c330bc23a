//! A GGUF file's weight type (`general.file_type`, llama.cpp's `llama_ftype`), checked against
//! the type a deployment's GPU memory was sized for.

use super::GgufFile;
use crate::engine::error::{EngineError, Result};

/// The key llama.cpp's converter and `llama-quantize` write the file's type under.
pub const FILE_TYPE_KEY: &str = "general.file_type";

/// llama.cpp sets this bit when it guessed the type from the tensors.
const GUESSED: u32 = 1024;

/// The name llama.cpp gives a `llama_ftype` value (the names of `llama-quantize` and of
/// files: `Q4_K_M`); `None` for values it no longer or never used.
pub fn file_type_name(value: u32) -> Option<&'static str> {
    Some(match value & !GUESSED {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// The file's weight type by name, when `general.file_type` gives a known one.
pub fn file_type(file: &GgufFile) -> Option<&'static str> {
    let value = file.metadata().get(FILE_TYPE_KEY)?.to_u32().ok()?;
    file_type_name(value)
}

/// Refuses a file whose `general.file_type` names another type than `expected`, the type the
/// deployment's GPU memory and cache budget were sized for: weights larger than planned would
/// not fit beside the planned cache, smaller ones leave memory unused. A file that names no
/// known type cannot be checked and passes, with a warning.
pub fn check_file_type(file: &GgufFile, expected: &str) -> Result<()> {
    match file_type(file) {
        Some(actual) if actual.eq_ignore_ascii_case(expected) => Ok(()),
        Some(actual) => Err(EngineError::GgufMetadata {
            path: file.path().to_owned(),
            key: FILE_TYPE_KEY.to_owned(),
            reason: format!(
                "the file's weights are {actual}, but the deployment was sized for {expected} \
                 weights (weightType; under the operator spec.source.quantization, or the type \
                 the file name names): set spec.source.quantization: {actual}"
            ),
        }),
        None => {
            tracing::warn!(
                path = %file.path().display(),
                expected,
                "the GGUF file names no known {FILE_TYPE_KEY}: its weight type is not checked"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_llama_cpps_and_the_guessed_bit_is_ignored() {
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(7), Some("Q8_0"));
        assert_eq!(file_type_name(32), Some("BF16"));
        assert_eq!(file_type_name(15 | GUESSED), Some("Q4_K_M"));
        assert_eq!(file_type_name(4), None);
        assert_eq!(file_type_name(u32::MAX), None);
    }
}
