//! `llama-server check-goldens`: runs the engine on a device against the transformers goldens of
//! `tests/goldens/` (made by scripts/reference/make_goldens.py), so a GPU build can be checked
//! on the GPU host with nothing but the binary, the tokenizer and the golden files.
//!
//! For every golden file (a tiny shape and seed) the model is regenerated with `generate-model`
//! (f32 weights, as the goldens were made), loaded in each requested dtype on the device, and
//! compared with transformers:
//!
//! - **prompt logits**: every prompt position, at the golden's vocabulary ids;
//! - **greedy alone**: the 64-step greedy continuation of each prompt, decoding one token a step;
//! - **greedy batched**: the same continuations with all prompts in one batch;
//! - **teacher-forced margin**: the prompt plus the golden continuation in one forward pass; at
//!   every step, how far the golden token's logit is below the largest logit (0 when it is the
//!   argmax).
//!
//! In f32 the greedy tokens must be identical and logits within [`F32_LOGIT_TOLERANCE`]. In bf16
//! (or f16) rounding makes near-ties flip, after which continuations legitimately part ways, so
//! the check asks instead that logits stay within [`HALF_LOGIT_TOLERANCE`] and that every golden
//! token be within [`HALF_MARGIN_TOLERANCE`] of the argmax; identical greedy tokens are reported,
//! not required.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::ValueEnum;
use serde::Deserialize;

use crate::device::{DeviceError, DeviceSpec, parse_dtype};
use crate::engine::{EngineError, LlamaConfig, LlamaModel, LogitsFor, Placement, SequenceStep};
use crate::generate_model::{GenerateModel, ModelShape, WeightDtype};
use crate::sampling::argmax;

/// Largest |logit − reference| accepted in f32 (the tests' tolerance; observed ~3e-7 on CPU).
pub const F32_LOGIT_TOLERANCE: f32 = 1e-3;
/// Largest |logit − reference| accepted in bf16 / f16. The tiny models' logits are about ±0.4;
/// bf16 keeps 8 significant bits, and the observed error is about 5e-3 on the CPU.
pub const HALF_LOGIT_TOLERANCE: f32 = 3e-2;
/// Largest gap between the argmax logit and the golden token's logit, teacher-forced, in bf16 /
/// f16: a golden token may lose to a near-tie, never to a clear winner.
pub const HALF_MARGIN_TOLERANCE: f32 = 3e-2;

/// Options of `check-goldens`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckGoldensArgs {
    /// Device to run on: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Directory of the golden files (inference-server/tests/goldens).
    #[arg(long)]
    pub goldens: PathBuf,
    /// Directory with tokenizer.json and tokenizer_config.json, copied into the regenerated
    /// models. Defaults to $LLAMA_SERVER_TOKENIZER_DIR.
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// Split each model's layers over this many GPUs, from --device's ordinal on, taking the
    /// layers round them (layer i on GPU (i + 1) mod N) so that every layer hands the hidden
    /// state to another GPU. On the CPU, N stand-ins for GPUs (a dry run of the same code).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub gpus: u32,
    /// Dtypes to run the models in, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16", value_parser = parse_dtype)]
    pub dtypes: Vec<DType>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Why the check could not run (a mismatch is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    InvalidGolden { path: PathBuf, reason: String },
    #[error("no golden model files (*.json with a shape, seed and prompts) in {0}")]
    NoGoldens(PathBuf),
    #[error("no tokenizer directory: give --tokenizer-dir or set LLAMA_SERVER_TOKENIZER_DIR")]
    NoTokenizer,
}

/// One golden file: a generated model and what transformers computed with it.
#[derive(Debug, Clone, Deserialize)]
struct GoldenFile {
    shape: String,
    seed: u64,
    logit_ids: Vec<u32>,
    prompts: Vec<GoldenPrompt>,
}

#[derive(Debug, Clone, Deserialize)]
struct GoldenPrompt {
    name: String,
    input_ids: Vec<u32>,
    logits_at_ids: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

/// The outcome for one prompt in one dtype.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PromptResult {
    pub prompt: String,
    /// Largest |logit − reference| over every prompt position and checked id.
    pub max_logit_diff: f32,
    /// Leading greedy tokens equal to the reference, decoding alone.
    pub greedy_alone_matching: usize,
    /// The same, with every prompt of the file in one batch.
    pub greedy_batched_matching: usize,
    pub greedy_tokens: usize,
    /// Largest (argmax logit − golden token's logit), teacher-forced over the continuation.
    pub worst_margin: f32,
}

/// The outcome for one golden file in one dtype.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelResult {
    pub golden: String,
    pub dtype: String,
    pub device: String,
    pub logit_tolerance: f32,
    /// `None` when greedy tokens must be identical (f32).
    pub margin_tolerance: Option<f32>,
    pub prompts: Vec<PromptResult>,
    pub passed: bool,
}

impl ModelResult {
    fn judge(&mut self) {
        self.passed = self.prompts.iter().all(|p| {
            p.max_logit_diff <= self.logit_tolerance
                && match self.margin_tolerance {
                    None => {
                        p.greedy_alone_matching == p.greedy_tokens
                            && p.greedy_batched_matching == p.greedy_tokens
                            && p.worst_margin == 0.0
                    }
                    Some(tolerance) => p.worst_margin <= tolerance,
                }
        });
    }
}

/// Every result of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GoldenReport {
    pub device: String,
    /// Devices each model's layers were split over (`--gpus`).
    pub gpus: u32,
    pub models: Vec<ModelResult>,
}

impl GoldenReport {
    /// Whether every model passed.
    pub fn passed(&self) -> bool {
        self.models.iter().all(|m| m.passed)
    }

    /// A table, one line per golden file and dtype, then a verdict line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<22} {:<5} {:<7} {:>7} {:>13} {:>9} {:>13} {:>14} {:>12} {:>9}  result",
            "golden",
            "dtype",
            "device",
            "prompts",
            "max |Δlogit|",
            "tolerance",
            "greedy alone",
            "greedy batched",
            "worst margin",
            "tolerance"
        );
        for model in &self.models {
            let sum = |f: fn(&PromptResult) -> usize| model.prompts.iter().map(f).sum::<usize>();
            let total = sum(|p| p.greedy_tokens);
            let max =
                |f: fn(&PromptResult) -> f32| model.prompts.iter().map(f).fold(0.0_f32, f32::max);
            let _ = writeln!(
                out,
                "{:<22} {:<5} {:<7} {:>7} {:>13.2e} {:>9.0e} {:>13} {:>14} {:>12.2e} {:>9}  {}",
                model.golden,
                model.dtype,
                model.device,
                model.prompts.len(),
                max(|p| p.max_logit_diff),
                model.logit_tolerance,
                format!("{}/{total}", sum(|p| p.greedy_alone_matching)),
                format!("{}/{total}", sum(|p| p.greedy_batched_matching)),
                max(|p| p.worst_margin),
                model
                    .margin_tolerance
                    .map_or_else(|| "0 (exact)".to_owned(), |t| format!("{t:.0e}")),
                if model.passed { "ok" } else { "FAILED" }
            );
        }
        let split = if self.gpus > 1 {
            format!(", layers split over {} devices", self.gpus)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "check-goldens: {} on {}{split}",
            if self.passed() { "passed" } else { "FAILED" },
            self.device
        );
        out
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// The model in `dir` with its layers round `devices`: layer i on device (i + 1) mod N, so the
/// embedding's device holds the last layers and every layer boundary is a handover.
fn load_round(dir: &Path, dtype: DType, devices: &[Device]) -> Result<LlamaModel, CheckError> {
    if devices.len() < 2 {
        return Ok(LlamaModel::load_on(dir, dtype, devices, |_| 0)?);
    }
    let layers = LlamaConfig::from_file(&dir.join("config.json"))?.num_hidden_layers;
    let placement = Placement::new(
        devices.to_vec(),
        (0..layers).map(|i| (i + 1) % devices.len()).collect(),
    )?;
    Ok(LlamaModel::load_placed(dir, dtype, placement)?)
}

/// Runs the whole check.
pub fn run(args: &CheckGoldensArgs) -> Result<GoldenReport, CheckError> {
    let gpus = args.gpus.max(1) as usize;
    let devices = match args.device {
        DeviceSpec::Cpu => vec![Device::Cpu; gpus],
        gpu => gpu.open_several(gpus)?,
    };
    let tokenizer_dir = args
        .tokenizer_dir
        .clone()
        .or_else(|| std::env::var_os("LLAMA_SERVER_TOKENIZER_DIR").map(PathBuf::from))
        .ok_or(CheckError::NoTokenizer)?;
    let goldens = read_goldens(&args.goldens)?;
    let scratch = std::env::temp_dir().join(format!("llama-check-goldens-{}", std::process::id()));
    let result = check_all(args, &devices, &tokenizer_dir, &goldens, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let report = GoldenReport {
        device: args.device.to_string(),
        gpus: args.gpus.max(1),
        models: result?,
    };
    if let Some(path) = &args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CheckError::InvalidGolden {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        std::fs::write(path, text + "\n").map_err(|source| CheckError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

fn check_all(
    args: &CheckGoldensArgs,
    devices: &[Device],
    tokenizer_dir: &Path,
    goldens: &[(String, GoldenFile)],
    scratch: &Path,
) -> Result<Vec<ModelResult>, CheckError> {
    let mut results = Vec::new();
    for (name, golden) in goldens {
        let shape = ModelShape::from_str(&golden.shape, false).map_err(|reason| {
            CheckError::InvalidGolden {
                path: args.goldens.join(format!("{name}.json")),
                reason: format!("shape: {reason}"),
            }
        })?;
        let dir = scratch.join(name);
        GenerateModel {
            shape,
            seed: golden.seed,
            out: dir.clone(),
            tokenizer_dir: tokenizer_dir.to_owned(),
            dtype: WeightDtype::F32,
        }
        .run()?;
        for &dtype in &args.dtypes {
            let model = load_round(&dir, dtype, devices)?;
            let exact = dtype == DType::F32;
            let mut result = ModelResult {
                golden: name.clone(),
                dtype: dtype_name(dtype).to_owned(),
                device: args.device.to_string(),
                logit_tolerance: if exact {
                    F32_LOGIT_TOLERANCE
                } else {
                    HALF_LOGIT_TOLERANCE
                },
                margin_tolerance: (!exact).then_some(HALF_MARGIN_TOLERANCE),
                prompts: check_model(&model, golden)?,
                passed: false,
            };
            result.judge();
            results.push(result);
        }
    }
    Ok(results)
}

/// The golden model files of a directory, by file stem, in name order. Other JSON files (the
/// chat-template goldens) are skipped.
fn read_goldens(dir: &Path) -> Result<Vec<(String, GoldenFile)>, CheckError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CheckError::Io { path, source }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut goldens = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| CheckError::InvalidGolden {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if value.get("shape").is_none() || value.get("prompts").is_none() {
            continue;
        }
        let golden: GoldenFile =
            serde_json::from_value(value).map_err(|e| CheckError::InvalidGolden {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let stem = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        goldens.push((stem, golden));
    }
    if goldens.is_empty() {
        return Err(CheckError::NoGoldens(dir.to_owned()));
    }
    Ok(goldens)
}

/// Every comparison for every prompt of one golden file.
fn check_model(model: &LlamaModel, golden: &GoldenFile) -> Result<Vec<PromptResult>, CheckError> {
    let batched = greedy_batched(model, golden)?;
    golden
        .prompts
        .iter()
        .zip(batched)
        .map(|(prompt, batched)| {
            let alone = greedy_alone(model, &prompt.input_ids, prompt.greedy.len())?;
            Ok(PromptResult {
                prompt: prompt.name.clone(),
                max_logit_diff: prompt_logit_diff(model, &golden.logit_ids, prompt)?,
                greedy_alone_matching: matching_prefix(&alone, &prompt.greedy),
                greedy_batched_matching: matching_prefix(&batched, &prompt.greedy),
                greedy_tokens: prompt.greedy.len(),
                worst_margin: teacher_forced_margin(model, prompt)?,
            })
        })
        .collect()
}

fn matching_prefix(actual: &[u32], expected: &[u32]) -> usize {
    actual
        .iter()
        .zip(expected)
        .take_while(|(a, b)| a == b)
        .count()
}

/// Logits of every position of `tokens`, run as one step from an empty cache.
fn all_logits(model: &LlamaModel, tokens: &[u32]) -> Result<Vec<Vec<f32>>, CheckError> {
    let mut cache = model.new_cache();
    let logits = model.forward(&mut [SequenceStep {
        tokens,
        cache: &mut cache,
        logits: LogitsFor::All,
    }])?;
    let rows = logits
        .first()
        .ok_or_else(|| EngineError::InvalidInput("no logits".into()))?
        .to_vec2()
        .map_err(EngineError::from)?;
    Ok(rows)
}

fn prompt_logit_diff(
    model: &LlamaModel,
    ids: &[u32],
    prompt: &GoldenPrompt,
) -> Result<f32, CheckError> {
    let rows = all_logits(model, &prompt.input_ids)?;
    let mut worst = 0.0_f32;
    for (row, want) in rows.iter().zip(&prompt.logits_at_ids) {
        for (&id, &want) in ids.iter().zip(want) {
            let got = row.get(id as usize).copied().unwrap_or(f32::NAN);
            // NaN compares false: count it as an infinite difference.
            let diff = (got - want).abs();
            worst = if diff.is_nan() {
                f32::INFINITY
            } else {
                worst.max(diff)
            };
        }
    }
    if rows.len() != prompt.logits_at_ids.len() {
        worst = f32::INFINITY;
    }
    Ok(worst)
}

/// The prompt and the golden continuation (but its last token) in one forward: at each step,
/// (largest logit − golden token's logit).
fn teacher_forced_margin(model: &LlamaModel, prompt: &GoldenPrompt) -> Result<f32, CheckError> {
    if prompt.greedy.is_empty() {
        return Ok(0.0);
    }
    let mut tokens = prompt.input_ids.clone();
    tokens.extend_from_slice(&prompt.greedy[..prompt.greedy.len() - 1]);
    let rows = all_logits(model, &tokens)?;
    let first = prompt.input_ids.len() - 1;
    let mut worst = 0.0_f32;
    for (row, &golden) in rows[first..].iter().zip(&prompt.greedy) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let own = row
            .get(golden as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        let margin = max - own;
        worst = if margin.is_nan() {
            f32::INFINITY
        } else {
            worst.max(margin)
        };
    }
    Ok(worst)
}

fn row_argmax(logits: &candle_core::Tensor) -> Result<u32, CheckError> {
    let row: Vec<f32> = logits
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(EngineError::from)?;
    Ok(argmax(&row))
}

/// Greedy continuation of one prompt, one token per step.
fn greedy_alone(model: &LlamaModel, prompt: &[u32], steps: usize) -> Result<Vec<u32>, CheckError> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let logits = model.forward(&mut [SequenceStep {
            tokens: &input,
            cache: &mut cache,
            logits: LogitsFor::Last,
        }])?;
        let token = row_argmax(
            logits
                .first()
                .ok_or_else(|| EngineError::InvalidInput("no logits".into()))?,
        )?;
        out.push(token);
        input = vec![token];
    }
    Ok(out)
}

/// Greedy continuations of every prompt of the file, all in one batch.
fn greedy_batched(model: &LlamaModel, golden: &GoldenFile) -> Result<Vec<Vec<u32>>, CheckError> {
    let steps = golden
        .prompts
        .iter()
        .map(|p| p.greedy.len())
        .max()
        .unwrap_or(0);
    let mut caches: Vec<_> = golden.prompts.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<Vec<u32>> = golden.prompts.iter().map(|p| p.input_ids.clone()).collect();
    let mut outputs = vec![Vec::with_capacity(steps); golden.prompts.len()];
    for _ in 0..steps {
        let mut batch: Vec<SequenceStep<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| SequenceStep {
                tokens,
                cache,
                logits: LogitsFor::Last,
            })
            .collect();
        let logits = model.forward(&mut batch)?;
        drop(batch);
        for ((row, output), input) in logits.iter().zip(&mut outputs).zip(&mut inputs) {
            let token = row_argmax(row)?;
            output.push(token);
            *input = vec![token];
        }
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(greedy: usize) -> PromptResult {
        PromptResult {
            prompt: "p".into(),
            max_logit_diff: 1e-6,
            greedy_alone_matching: greedy,
            greedy_batched_matching: greedy,
            greedy_tokens: 64,
            worst_margin: 0.0,
        }
    }

    fn model(margin_tolerance: Option<f32>, prompts: Vec<PromptResult>) -> ModelResult {
        let mut result = ModelResult {
            golden: "tiny-seed42".into(),
            dtype: "f32".into(),
            device: "cpu".into(),
            logit_tolerance: 1e-3,
            margin_tolerance,
            prompts,
            passed: false,
        };
        result.judge();
        result
    }

    #[test]
    fn exact_dtypes_need_every_greedy_token_and_half_ones_a_small_margin() {
        assert!(model(None, vec![prompt(64)]).passed);
        assert!(!model(None, vec![prompt(63)]).passed);
        let mut diverged = prompt(20);
        diverged.worst_margin = 0.01;
        assert!(model(Some(0.03), vec![diverged.clone()]).passed);
        diverged.worst_margin = 0.5;
        assert!(!model(Some(0.03), vec![diverged]).passed);
        let mut far = prompt(64);
        far.max_logit_diff = 0.1;
        assert!(!model(Some(0.03), vec![far]).passed);
    }

    #[test]
    fn matching_prefix_stops_at_the_first_difference() {
        assert_eq!(matching_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(matching_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(matching_prefix(&[], &[1]), 0);
    }

    #[test]
    fn the_table_has_a_line_per_model_and_a_verdict() {
        let mut report = GoldenReport {
            device: "cpu".into(),
            gpus: 1,
            models: vec![model(None, vec![prompt(64), prompt(64)])],
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[1].contains("128/128") && lines[1].ends_with("ok"),
            "{table}"
        );
        assert_eq!(lines[2], "check-goldens: passed on cpu");
        report.gpus = 2;
        let table = report.table();
        assert_eq!(
            table.lines().last(),
            Some("check-goldens: passed on cpu, layers split over 2 devices")
        );
    }
}
