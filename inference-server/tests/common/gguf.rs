//! Helpers of the GGUF tests: exported files cached per tiny model, probe logits and how far
//! two sets of them are apart, rewriting a GGUF file.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::{DType, Device};
use llama_server::engine::{LlamaModel, LogitsFor, SequenceStep};
use llama_server::generate_model::ModelShape;
use llama_server::gguf_export::{GgufFileType, export_gguf};

use super::tiny_model;

pub const PROBE: [u32; 8] = [128_000, 791, 6864, 315, 9822, 374, 12366, 13];
/// Tokens of context before the probe in the deep comparison.
pub const DEPTH: usize = 1024;

/// The exporter's source: a cached GGUF file is reused only while it is unchanged.
const EXPORTER_SOURCE: [&str; 5] = [
    include_str!("../../src/gguf_export/mod.rs"),
    include_str!("../../src/gguf_export/tensor_types.rs"),
    include_str!("../../src/gguf_export/tokenizer_metadata.rs"),
    include_str!("../../src/engine/gguf/layout.rs"),
    include_str!("../../src/engine/rope.rs"),
];

/// The GGUF file of a tiny model, exported once and cached under the target directory.
pub fn gguf_of(shape: ModelShape, seed: u64, file_type: GgufFileType) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let model = tiny_model(shape, seed);
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (EXPORTER_SOURCE, &model, file_type).hash(&mut hasher);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("models");
    let path = dir.join(format!(
        "gguf-{shape:?}-{seed}-{:016x}-{}",
        hasher.finish(),
        file_type.file_name()
    ));
    if !path.is_file() {
        // Another test process may write the same file: each writes its own, then renames.
        let partial = dir.join(format!(
            "partial-{}-{}",
            std::process::id(),
            file_type.name()
        ));
        export_gguf(&model, file_type, &partial).expect("export GGUF");
        std::fs::rename(&partial, &path).expect("rename");
    }
    path
}

pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("gguf-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

pub fn load(path: &Path) -> LlamaModel {
    LlamaModel::load(path, DType::F32, &Device::Cpu)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// [`load`], with an f32 key/value cache instead of the f16 one GGUF files get by default:
/// for comparisons with a forward pass that is f32 throughout.
pub fn load_with_f32_cache(path: &Path) -> LlamaModel {
    let mut model = load(path);
    assert_eq!(model.kv_dtype(), DType::F16, "a GGUF file's default cache");
    model.set_kv_dtype(DType::F32).expect("an empty pool");
    model
}

/// Deterministic context tokens, spread over the vocabulary.
pub fn context(len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + 13) % 128_000) as u32)
        .collect()
}

/// Logits of the probe tokens after `depth` tokens of context.
pub fn probe_logits(model: &LlamaModel, depth: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    if depth > 0 {
        let prefix = context(depth);
        model
            .forward(&mut [SequenceStep {
                tokens: &prefix,
                cache: &mut cache,
                logits: LogitsFor::Last,
            }])
            .expect("context");
    }
    model
        .forward(&mut [SequenceStep {
            tokens: &PROBE,
            cache: &mut cache,
            logits: LogitsFor::All,
        }])
        .expect("probe")[0]
        .to_vec2()
        .expect("logits")
}

/// How far one set of logits is from a reference.
#[derive(Debug)]
pub struct Difference {
    pub max_abs: f32,
    pub rms: f32,
    /// Standard deviation of the reference logits, for scale.
    pub spread: f32,
    pub correlation: f64,
    /// Rows whose argmax (the greedy token) agrees.
    pub top1_agree: usize,
    /// The worst rank, among the other logits, of the reference's greedy token (0 = also first).
    pub worst_rank: usize,
}

pub fn compare(reference: &[Vec<f32>], other: &[Vec<f32>]) -> Difference {
    assert_eq!(reference.len(), other.len());
    let a: Vec<f64> = reference.iter().flatten().map(|&v| f64::from(v)).collect();
    let b: Vec<f64> = other.iter().flatten().map(|&v| f64::from(v)).collect();
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    let (mean_a, mean_b) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - mean_a) * (y - mean_b))
        .sum();
    let var_a: f64 = a.iter().map(|x| (x - mean_a).powi(2)).sum();
    let var_b: f64 = b.iter().map(|y| (y - mean_b).powi(2)).sum();
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map_or(0, |(i, _)| i)
    };
    let ranks: Vec<usize> = reference
        .iter()
        .zip(other)
        .map(|(x, y)| {
            let best = y[argmax(x)];
            y.iter().filter(|&&v| v > best).count()
        })
        .collect();
    Difference {
        max_abs: a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() as f32)
            .fold(0.0, f32::max),
        rms: (a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / n).sqrt() as f32,
        spread: (var_a / n).sqrt() as f32,
        correlation: cov / (var_a * var_b).sqrt(),
        top1_agree: ranks.iter().filter(|&&r| r == 0).count(),
        worst_rank: ranks.into_iter().max().unwrap_or(0),
    }
}

/// A model's probe logits at some depths.
pub struct Probed(pub Vec<(usize, Vec<Vec<f32>>)>);

impl Probed {
    /// At depth 0 and at [`DEPTH`].
    pub fn of(model: &LlamaModel) -> Self {
        Self::at(model, &[0, DEPTH])
    }

    pub fn at(model: &LlamaModel, depths: &[usize]) -> Self {
        Self(
            depths
                .iter()
                .map(|&d| (d, probe_logits(model, d)))
                .collect(),
        )
    }

    /// Compares another model with these logits at both depths.
    pub fn against(&self, model: &LlamaModel, label: &str) -> Vec<Difference> {
        self.0
            .iter()
            .map(|(depth, expected)| {
                let diff = compare(expected, &probe_logits(model, *depth));
                println!("{label} at depth {depth}: {diff:?}");
                diff
            })
            .collect()
    }
}

/// A file's metadata entries, as [`rewrite`] edits them.
pub type Metadata = Vec<(String, Value)>;

/// Drops the 128k-token vocabulary, which the loader does not read: copies are quicker to write
/// and to open.
pub fn without_tokenizer(metadata: &mut Metadata) {
    metadata.retain(|(key, _)| !key.starts_with("tokenizer."));
}

/// A metadata edit for [`rewrite`] that gives `key` the value `value`.
pub fn set(key: &'static str, value: Value) -> impl Fn(&mut Metadata) {
    move |metadata: &mut Metadata| {
        for (k, v) in metadata.iter_mut() {
            if k == key {
                *v = value.clone();
            }
        }
    }
}

/// A GGUF file's metadata and tensors, the tensors in name order.
fn read_all(from: &Path) -> (Metadata, Vec<(String, QTensor)>) {
    let mut reader = std::io::BufReader::new(std::fs::File::open(from).expect("open"));
    let content = Content::read(&mut reader).expect("read");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|name| {
            let tensor = content
                .tensor(&mut reader, name, &Device::Cpu)
                .expect("tensor");
            (name.clone(), tensor)
        })
        .collect();
    (content.metadata.into_iter().collect(), tensors)
}

/// Writes a GGUF file.
fn write_gguf(to: &Path, metadata: &Metadata, tensors: &[(String, QTensor)]) {
    let mut writer = std::io::BufWriter::new(std::fs::File::create(to).expect("create"));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors).expect("write");
}

/// Copies a GGUF file, editing its metadata and mapping (or dropping) tensors.
pub fn rewrite(
    from: &Path,
    to: &Path,
    edit_metadata: impl FnOnce(&mut Metadata),
    mut map_tensor: impl FnMut(&str, QTensor) -> Option<QTensor>,
) {
    let (mut metadata, tensors) = read_all(from);
    edit_metadata(&mut metadata);
    let tensors: Vec<(String, QTensor)> = tensors
        .into_iter()
        .filter_map(|(name, tensor)| map_tensor(&name, tensor).map(|t| (name, t)))
        .collect();
    write_gguf(to, &metadata, &tensors);
}

/// Splits the GGUF file `from` into `parts` files in `dir` as llama.cpp's `gguf-split` does:
/// `{name}-00001-of-0000N.gguf`, …; the first keeps the metadata, every part gets `split.no`,
/// `split.count` and `split.tensors.count`, and the tensors are dealt out in name order.
pub fn split(from: &Path, dir: &Path, name: &str, parts: u16) -> Vec<PathBuf> {
    let (all_metadata, tensors) = read_all(from);
    let per_part = tensors.len().div_ceil(usize::from(parts));
    let mut paths = Vec::new();
    for (no, chunk) in tensors.chunks(per_part).enumerate() {
        let mut metadata: Metadata = if no == 0 {
            all_metadata.clone()
        } else {
            Vec::new()
        };
        metadata.push(("split.no".into(), Value::U16(no as u16)));
        metadata.push(("split.count".into(), Value::U16(parts)));
        metadata.push((
            "split.tensors.count".into(),
            Value::I32(tensors.len() as i32),
        ));
        let path = dir.join(format!("{name}-{:05}-of-{parts:05}.gguf", no + 1));
        write_gguf(&path, &metadata, chunk);
        paths.push(path);
    }
    assert_eq!(paths.len(), usize::from(parts), "every part holds tensors");
    paths
}
