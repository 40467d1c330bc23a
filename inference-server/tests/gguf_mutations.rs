//! Corrupt GGUF files never take the process down. Mutations of real files (header bytes
//! overwritten, 4- and 8-byte fields set to extreme values, the file cut short, tensor data
//! scrambled, and every numeric metadata value in turn set to 0, 2³¹, 2³² − 1, NaN, …) either
//! load or fail with an error naming the file; neither loading, the tokenizer's rebuild and use,
//! nor a forward pass over scrambled weights panics or aborts. (A `llama.block_count` of
//! 2³² − 1 once sized an allocation and aborted the process: layer counts and sizes are now
//! bounded when the configuration is validated.)

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device};
use llama_server::chat_template::{ChatMessage, ChatTemplate};
use llama_server::engine::{LlamaModel, LogitsFor, SequenceStep};
use llama_server::generate_model::ModelShape;
use llama_server::gguf_export::GgufFileType;
use llama_server::tokenizer::LlamaTokenizer;

use common::gguf::{Metadata, gguf_of, rewrite, scratch, set, without_tokenizer};

/// A small deterministic generator (SplitMix64): the same mutations every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What one mutated file did.
#[derive(Debug, Default)]
struct Outcome {
    loaded: usize,
    refused: usize,
    /// Files whose tokenizer was rebuilt (where asked).
    tokenizers: usize,
    panics: Vec<String>,
}

/// Loads `path` (when asked, rebuilds its tokenizer first, and runs a short forward pass over
/// what loaded), recording a panic as a failure with `what` was done to the file.
fn attempt(path: &Path, what: &str, tokenizer: bool, forward: bool, outcome: &mut Outcome) {
    let result = catch_unwind(AssertUnwindSafe(|| {
        if tokenizer && exercise_tokenizer(path) {
            outcome.tokenizers += 1;
        }
        match LlamaModel::load_gguf(path, DType::F32, &Device::Cpu) {
            Ok(model) => {
                if forward {
                    // Whatever the weights now hold (NaN, infinities), a step returns or errs.
                    let mut cache = model.new_cache();
                    let _ = model.forward(&mut [SequenceStep {
                        tokens: &[1000, 791, 6],
                        cache: &mut cache,
                        logits: LogitsFor::Last,
                    }]);
                }
                true
            }
            Err(err) => {
                let message = err.to_string();
                assert!(
                    message.contains(&path.display().to_string()),
                    "{what}: the error does not name the file: {message}"
                );
                false
            }
        }
    }));
    match result {
        Ok(true) => outcome.loaded += 1,
        Ok(false) => outcome.refused += 1,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            outcome.panics.push(format!("{what}: {detail}"));
        }
    }
}

/// Rebuilds the file's tokenizer and, where that works, encodes, decodes and renders a chat
/// with it. Errors are fine; what matters is that nothing panics.
fn exercise_tokenizer(path: &Path) -> bool {
    let Ok(tokenizer) = LlamaTokenizer::from_gguf(path) else {
        return false;
    };
    if let Ok(ids) = tokenizer.encode("Hello, wörld 123 <|eot_id|>\t\r\n 漢字 🦙", true) {
        let _ = tokenizer.decode(&ids, false);
    }
    let every: Vec<u32> = (0..tokenizer.vocab_size() as u32 + 8).collect();
    let _ = tokenizer.decode(&every, true);
    let mut stream = tokenizer.decode_stream(false);
    for &id in every.iter().step_by(7) {
        let _ = stream.push(id);
    }
    if let Ok(template) = ChatTemplate::from_tokenizer(&tokenizer) {
        let _ = template.render(
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            true,
        );
    }
    true
}

/// The byte offset where tensor data starts: everything before it is header.
fn header_len(path: &Path) -> usize {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).expect("open"));
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut reader).expect("a valid file");
    content.tensor_data_offset as usize
}

/// Runs `count` mutations of each kind over `original`.
fn mutate(original: &Path, count: usize, seed: u64, tokenizer: bool) -> Outcome {
    if let Err(err) = LlamaModel::load_gguf(original, DType::F32, &Device::Cpu) {
        panic!("the unmutated file must load: {err}");
    }
    let bytes = std::fs::read(original).expect("read");
    let header = header_len(original);
    let dir = scratch();
    let path = dir.path().join("mutated.gguf");
    let mut rng = Mix(seed);
    let mut outcome = Outcome::default();
    let extremes: [u64; 7] = [0, 1, 0x7f, u64::from(u32::MAX), 1 << 31, 1 << 40, u64::MAX];
    for i in 0..count {
        let mut mutated = bytes.clone();
        let kind = i % 4;
        let what = match kind {
            0 => {
                // One to four header bytes overwritten.
                let at = rng.below(header);
                let n = 1 + rng.below(4);
                for byte in &mut mutated[at..(at + n).min(header)] {
                    *byte = rng.next() as u8;
                }
                format!("header bytes {at}..{}", at + n)
            }
            1 => {
                // A 4- or 8-byte field (a length, count, type or dimension) set to an extreme.
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let at = rng.below(header.saturating_sub(width));
                let value = extremes[rng.below(extremes.len())];
                mutated[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
                format!("{width}-byte field at {at} = {value:#x}")
            }
            2 => {
                let len = rng.below(bytes.len());
                mutated.truncate(len);
                format!("cut to {len} bytes")
            }
            _ => {
                // Tensor data scrambled: scales and values become anything, NaN included.
                let n = 1 + rng.below(64);
                for _ in 0..n {
                    let at = header + rng.below(bytes.len() - header);
                    mutated[at] = rng.next() as u8;
                }
                format!("{n} tensor-data bytes")
            }
        };
        std::fs::write(&path, &mutated).expect("write");
        attempt(&path, &what, tokenizer, kind == 3, &mut outcome);
    }
    outcome
}

/// A tiny model's file without the tokenizer and with a 1,024-token vocabulary: quick to load
/// a thousand times in a debug build.
/// Every integer metadata value of `original` in turn set to 0, 2³¹ and 2³² − 1 (the value's
/// own type where it holds them, else a u32), and every float one to 0, −1, NaN and ∞: the
/// counts and sizes an allocation could be sized by.
fn extreme_metadata(original: &Path, tokenizer: bool) -> Outcome {
    let mut reader = std::io::BufReader::new(std::fs::File::open(original).expect("open"));
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut reader).expect("a valid file");
    let mut keys: Vec<(String, Value)> = content.metadata.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let dir = scratch();
    let path = dir.path().join("extreme.gguf");
    let mut outcome = Outcome::default();
    for (key, value) in keys {
        let extremes: Vec<Value> = match value {
            Value::U8(_) | Value::I8(_) | Value::U16(_) | Value::I16(_) | Value::Bool(_) => {
                vec![Value::U32(0), Value::U32(u32::MAX)]
            }
            Value::U32(_) | Value::I32(_) => {
                vec![Value::U32(0), Value::U32(1 << 31), Value::U32(u32::MAX)]
            }
            Value::U64(_) | Value::I64(_) => {
                vec![Value::U64(0), Value::U64(1 << 40), Value::U64(u64::MAX)]
            }
            Value::F32(_) | Value::F64(_) => [0.0, -1.0, f32::NAN, f32::INFINITY]
                .into_iter()
                .map(Value::F32)
                .collect(),
            Value::String(_) | Value::Array(_) => continue,
        };
        for extreme in extremes {
            let what = format!("{key} = {extreme:?}");
            let key = key.clone();
            rewrite(
                original,
                &path,
                move |metadata| {
                    for (k, v) in metadata.iter_mut() {
                        if *k == key {
                            *v = extreme.clone();
                        }
                    }
                },
                |_, t| Some(t),
            );
            attempt(&path, &what, tokenizer, false, &mut outcome);
        }
    }
    outcome
}

fn lean(shape: ModelShape, file_type: GgufFileType, dir: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("{shape:?}-{}", file_type.file_name()));
    rewrite(
        &gguf_of(shape, 3, file_type),
        &path,
        |metadata| {
            without_tokenizer(metadata);
            set("llama.vocab_size", Value::U32(1024))(metadata);
        },
        first_rows,
    );
    path
}

/// The embedding and output rows of the first 1,024 tokens (copied into their own storage:
/// the quantizer reads a view's whole storage); other tensors as they are.
fn first_rows(name: &str, t: QTensor) -> Option<QTensor> {
    if name != "token_embd.weight" && name != "output.weight" {
        return Some(t);
    }
    let rows = t
        .dequantize(&Device::Cpu)
        .and_then(|w| w.narrow(0, 0, 1024)?.affine(1.0, 0.0))
        .expect("the first rows");
    Some(QTensor::quantize(&rows, t.dtype()).expect("requantize"))
}

#[test]
fn corrupt_weight_files_are_refused_or_loaded_never_a_panic() {
    let dir = scratch();
    let mut report = Vec::new();
    let mut panics = Vec::new();
    for (shape, file_type) in [
        (ModelShape::Tiny, GgufFileType::Q8_0),
        (ModelShape::Tiny, GgufFileType::F16),
        (ModelShape::Tiny256, GgufFileType::Q4KM),
    ] {
        let path = lean(shape, file_type, dir.path());
        for (kind, outcome) in [
            ("bytes", mutate(&path, 300, 17, false)),
            ("metadata values", extreme_metadata(&path, false)),
        ] {
            report.push(format!(
                "{shape:?} {}, {kind}: {} loaded, {} refused",
                file_type.name(),
                outcome.loaded,
                outcome.refused
            ));
            panics.extend(outcome.panics);
        }
    }
    println!("{}", report.join("\n"));
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
}

/// [`lean`] with a tokenizer of the vocabulary's first 1,024 tokens: the merges among them, the
/// special tokens moved to ids 1000 and up (as control tokens), the chat template as it was.
fn lean_with_tokenizer(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokenizer-model-q8_0.gguf");
    rewrite(
        &gguf_of(ModelShape::Tiny, 3, GgufFileType::Q8_0),
        &path,
        |metadata| {
            let get = |metadata: &Metadata, key: &str| {
                metadata
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            let Some(Value::Array(tokens)) = get(metadata, "tokenizer.ggml.tokens") else {
                panic!("the file has tokens");
            };
            let kept: Vec<Value> = tokens[..1024].to_vec();
            // Ids from 1000 become control tokens, outside the BPE vocabulary.
            let texts: std::collections::HashSet<String> = kept[..1000]
                .iter()
                .filter_map(|v| v.to_string().ok().cloned())
                .collect();
            let Some(Value::Array(merges)) = get(metadata, "tokenizer.ggml.merges") else {
                panic!("the file has merges");
            };
            let merges: Vec<Value> = merges
                .into_iter()
                .filter(|m| {
                    m.to_string().ok().is_some_and(|m| {
                        let mut parts = m.split(' ');
                        let (a, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                        texts.contains(a) && texts.contains(b) && texts.contains(&format!("{a}{b}"))
                    })
                })
                .collect();
            assert!(merges.len() > 100, "{} merges kept", merges.len());
            let mut types: Vec<Value> = vec![Value::I32(1); 1024];
            let mut next_special = 1000;
            for (key, value) in metadata.iter_mut() {
                if key.starts_with("tokenizer.ggml.") && key.ends_with("_token_id") {
                    types[next_special] = Value::I32(3);
                    *value = Value::U32(next_special as u32);
                    next_special += 1;
                }
            }
            set("tokenizer.ggml.tokens", Value::Array(kept))(metadata);
            set("tokenizer.ggml.token_type", Value::Array(types))(metadata);
            set("tokenizer.ggml.merges", Value::Array(merges))(metadata);
            set("llama.vocab_size", Value::U32(1024))(metadata);
        },
        first_rows,
    );
    path
}

#[test]
fn corrupt_tokenizer_metadata_is_refused_or_loaded_never_a_panic() {
    let dir = scratch();
    let path = lean_with_tokenizer(dir.path());
    let tokenizer = LlamaTokenizer::from_gguf(&path).expect("the unmutated tokenizer");
    assert_eq!(tokenizer.vocab_size(), 1024);
    let ids = tokenizer.encode("the cat", false).expect("encodes");
    assert_eq!(tokenizer.decode(&ids, false).expect("decodes"), "the cat");
    assert!(exercise_tokenizer(&path));
    let mut panics = Vec::new();
    for (kind, outcome) in [
        ("bytes", mutate(&path, 400, 29, true)),
        ("metadata values", extreme_metadata(&path, true)),
    ] {
        println!(
            "{kind}: {} loaded, {} refused; {} tokenizers rebuilt",
            outcome.loaded, outcome.refused, outcome.tokenizers
        );
        panics.extend(outcome.panics);
    }
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
}
