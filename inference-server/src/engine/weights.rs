//! Memory-mapped safetensors weights, single-file or sharded, with errors that name the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};

/// The weight files of a model directory, mapped into memory.
pub struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name → index into `files`.
    routing: HashMap<String, usize>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("tensors", &self.routing.len())
            .finish()
    }
}

/// `model.safetensors.index.json`: which shard holds which tensor.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl WeightFiles {
    /// Maps `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| EngineError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|err| EngineError::InvalidJson {
                    path: index_path.clone(),
                    reason: err.to_string(),
                })?;
            let mut shards: Vec<&String> = index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|shard| dir.join(shard)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(EngineError::Io {
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                    path,
                });
            }
            let mapped = map_file(&path)?;
            for (name, _) in mapped.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path, mapped));
        }
        Ok(Self { files, routing })
    }

    /// Whether a tensor of that name exists in any file.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// The dtype tensor `name` is stored in, where a file holds it and candle reads its type.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let index = *self.routing.get(name)?;
        let view = self.files[index].1.get(name).ok()?;
        DType::try_from(view.dtype()).ok()
    }

    /// Loads tensor `name`, checking it has `shape`, converted to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let index = *self
            .routing
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                name: name.to_owned(),
                files: self.file_list(),
            })?;
        let (path, mapped) = &self.files[index];
        let view = mapped
            .get(name)
            .map_err(|err| EngineError::CorruptWeights {
                path: path.clone(),
                reason: err.to_string(),
            })?;
        if view.shape() != shape {
            return Err(EngineError::TensorShapeMismatch {
                name: name.to_owned(),
                path: path.clone(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let tensor = mapped
            .load(name, device)
            .map_err(|err| EngineError::CorruptWeights {
                path: path.clone(),
                reason: format!("tensor `{name}`: {err}"),
            })?;
        Ok(tensor.to_dtype(dtype)?)
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|(path, _)| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Maps one safetensors file and parses its header.
#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: the mapping is read-only. Like every memory-mapped model loader, this assumes the
    // weight files are not truncated or rewritten while the server runs; model directories are
    // written once (by a download or `generate-model`) and then only read.
    unsafe { MmapedSafetensors::new(path) }.map_err(|err| EngineError::CorruptWeights {
        path: path.to_owned(),
        reason: err.to_string(),
    })
}
