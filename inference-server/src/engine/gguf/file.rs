//! An opened GGUF file: its parsed header and tensors read on demand, with errors that name the
//! file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::engine::error::{EngineError, Result};

/// A GGUF file whose header (metadata and tensor directory) has been read: one file, or the
/// parts of a file split by llama.cpp's `gguf-split` (`NAME-00001-of-00003.gguf`, …; the first
/// holds the metadata, each its share of the tensors), opened from the first part.
pub struct GgufFile {
    /// The file, or the first part.
    path: PathBuf,
    parts: Vec<Part>,
    /// Which part holds each tensor.
    index: HashMap<String, usize>,
}

/// One file of a GGUF model.
struct Part {
    path: PathBuf,
    content: Content,
    reader: PositionedReader,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("parts", &self.parts.len())
            .field("metadata", &self.metadata().len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// The metadata keys of a split file (llama.cpp's `gguf-split`).
const SPLIT_COUNT: &str = "split.count";
const SPLIT_NO: &str = "split.no";

impl GgufFile {
    /// Opens `path` and parses its header; for the first part of a split file, the other
    /// parts' too, from the same directory.
    pub fn open(path: &Path) -> Result<Self> {
        let first = Part::open(path)?;
        let count = split_value(&first, SPLIT_COUNT)?.unwrap_or(1).max(1);
        let mut parts = vec![first];
        if count > 1 {
            if split_value(&parts[0], SPLIT_NO)?.unwrap_or(0) != 0 {
                return Err(split_error(
                    path,
                    "is not the first part of its split file: open NAME-00001-of-NNNNN.gguf",
                ));
            }
            for no in 1..count {
                let other = split_part_path(path, no, count)?;
                let part = Part::open(&other)?;
                let (part_no, part_count) = (
                    split_value(&part, SPLIT_NO)?,
                    split_value(&part, SPLIT_COUNT)?,
                );
                if part_no != Some(no) || part_count != Some(count) {
                    return Err(split_error(
                        &other,
                        &format!(
                            "is not part {} of {count} (its split.no {part_no:?}, split.count \
                             {part_count:?})",
                            no + 1
                        ),
                    ));
                }
                parts.push(part);
            }
        }
        let mut index = HashMap::new();
        for (i, part) in parts.iter().enumerate() {
            for name in part.content.tensor_infos.keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(split_error(
                        &part.path,
                        &format!("repeats tensor `{name}` of an earlier part"),
                    ));
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            parts,
            index,
        })
    }

    /// The file's path (the first part's, for a split file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many files the model spans (1 unless split).
    pub fn part_count(&self) -> usize {
        self.parts.len()
    }

    /// All metadata entries (the first part's, for a split file).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].content.metadata
    }

    /// Whether the file holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The names of all tensors, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The shape of tensor `name` in row-major order (`[rows, columns]` for a matrix).
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(self.info(name)?.shape.dims())
    }

    /// The storage type of tensor `name`.
    pub fn dtype(&self, name: &str) -> Result<GgmlDType> {
        Ok(self.info(name)?.ggml_dtype)
    }

    /// Reads tensor `name` onto `device`, checking that it has `shape`.
    pub fn read(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let at = *self
            .index
            .get(name)
            .ok_or_else(|| missing(&self.path, name))?;
        let part = &mut self.parts[at];
        // Borrow the fields apart: the directory is read while the reader moves.
        let info = part
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| missing(&part.path, name))?;
        if info.shape.dims() != shape {
            return Err(EngineError::TensorShapeMismatch {
                name: name.to_owned(),
                path: part.path.clone(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        info.read(&mut part.reader, part.content.tensor_data_offset, device)
            .map_err(|err| EngineError::InvalidGguf {
                path: part.path.clone(),
                reason: format!("tensor `{name}`: {err}"),
            })
    }

    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.index
            .get(name)
            .and_then(|&at| self.parts[at].content.tensor_infos.get(name))
            .ok_or_else(|| missing(&self.path, name))
    }
}

impl Part {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = PositionedReader {
            inner: BufReader::with_capacity(1 << 20, file),
            position: 0,
        };
        let content = read_header(&mut reader).map_err(|reason| EngineError::InvalidGguf {
            path: path.to_owned(),
            reason,
        })?;
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
        })
    }
}

/// A split key's value (`split.count`, `split.no`), when present.
fn split_value(part: &Part, key: &str) -> Result<Option<u32>> {
    match part.content.metadata.get(key) {
        None => Ok(None),
        Some(value) => value
            .to_u16()
            .map(u32::from)
            .or_else(|_| value.to_u32())
            .map(Some)
            .map_err(|_| split_error(&part.path, &format!("`{key}` is not a count"))),
    }
}

/// The path of part `no` (0-based) of `count`, beside the first part `first`
/// (`NAME-00001-of-00003.gguf` → `NAME-00002-of-00003.gguf`).
pub fn split_part_path(first: &Path, no: u32, count: u32) -> Result<PathBuf> {
    let name = first
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let prefix = split_prefix(name).ok_or_else(|| {
        split_error(
            first,
            &format!(
                "says it is split in {count} parts, but its name is not NAME-00001-of-{count:05}.gguf"
            ),
        )
    })?;
    Ok(first.with_file_name(format!("{prefix}-{:05}-of-{count:05}.gguf", no + 1)))
}

/// `NAME` of a split part's file name `NAME-0000K-of-0000N.gguf`.
pub fn split_prefix(name: &str) -> Option<&str> {
    let stem = name
        .strip_suffix(".gguf")
        .or_else(|| name.strip_suffix(".GGUF"))?;
    let (left, total) = stem.rsplit_once("-of-")?;
    let (prefix, number) = left.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (digits(number) && digits(total)).then_some(prefix)
}

fn split_error(path: &Path, reason: &str) -> EngineError {
    EngineError::InvalidGguf {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Parses the header with candle's reader. Its checks cover most malformed headers; a few
/// values still make it panic (a `general.alignment` of zero divides by zero), so a panic is
/// caught and reported as a malformed header of this file instead of taking the process down.
fn read_header(reader: &mut PositionedReader) -> std::result::Result<Content, String> {
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader)));
    match parsed {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(err)) => Err(err.to_string()),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!(
                "its header is malformed (the GGUF parser stopped with \"{detail}\"): \
                 re-export or re-download the file"
            ))
        }
    }
}

fn missing(path: &Path, name: &str) -> EngineError {
    EngineError::MissingTensor {
        name: name.to_owned(),
        files: path.display().to_string(),
    }
}

/// A buffered file reader that knows its position. candle's header parser asks for the position
/// before every string (a 128k-token vocabulary has ~400k of them); answering from memory
/// instead of with a system call makes opening a Llama 3 GGUF several times faster.
struct PositionedReader {
    inner: BufReader<File>,
    position: u64,
}

impl Read for PositionedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for PositionedReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.position = self.inner.seek(to)?;
        Ok(self.position)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_part_names_follow_gguf_split() {
        assert_eq!(
            split_prefix("Llama-3.1-405B-Instruct-Q4_K_M-00001-of-00005.gguf"),
            Some("Llama-3.1-405B-Instruct-Q4_K_M")
        );
        assert_eq!(split_prefix("model-q4_k_m.gguf"), None);
        assert_eq!(split_prefix("model-1-of-2.gguf"), None);
        let first = Path::new("/m/x-Q8_0-00001-of-00003.gguf");
        assert_eq!(
            split_part_path(first, 2, 3).expect("a split name"),
            Path::new("/m/x-Q8_0-00003-of-00003.gguf")
        );
        let err = split_part_path(Path::new("/m/model.gguf"), 1, 2).expect_err("not a split name");
        assert!(
            err.to_string().contains("NAME-00001-of-00002.gguf"),
            "{err}"
        );
    }
}
