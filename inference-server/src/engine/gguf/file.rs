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

/// A GGUF file whose header (metadata and tensor directory) has been read.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: PositionedReader,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("metadata", &self.content.metadata.len())
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
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

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Whether the file holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The names of all tensors, in no particular order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
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
        // Borrow the fields apart: the directory is read while the reader moves.
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| missing(&self.path, name))?;
        if info.shape.dims() != shape {
            return Err(EngineError::TensorShapeMismatch {
                name: name.to_owned(),
                path: self.path.clone(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        info.read(&mut self.reader, self.content.tensor_data_offset, device)
            .map_err(|err| EngineError::InvalidGguf {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {err}"),
            })
    }

    fn info(&self, name: &str) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| missing(&self.path, name))
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
