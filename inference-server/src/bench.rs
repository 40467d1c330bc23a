//! `llama-server bench`: the engine's speed on a device, without HTTP or queueing.
//!
//! It drives the scheduler's unit of work directly: [`ActiveSequence`]s (greedy sampling,
//! streaming detokenization, stop handling) stepped through batched [`LlamaModel::forward`]
//! calls, as the engine thread does. Measured, each as the median of `--repeats` runs after one
//! unrecorded warm-up run:
//!
//! - **prefill**: one prompt of each `--prefill-tokens` length, fed in steps of at most
//!   `--prefill-chunk-tokens` as the server feeds it, until its first token is sampled;
//!   reported as prompt tokens per second and as the time to first token;
//! - **decode**: every `--batch` size of sequences, each with a `--prompt-tokens` prompt, is
//!   prefilled once (not timed, in chunks as above); then one unrecorded warm-up window and `--repeats` timed
//!   windows of `--decode-tokens` steps follow one another on the same sequences (so the
//!   context grows by `--decode-tokens` a window). Reported as tokens per second over the
//!   batch and per stream.
//!
//! Decoding one token reads every weight once, so with `--bandwidth-gbs` (the device's measured
//! memory bandwidth) each decode line also shows its share of the bandwidth ceiling,
//! `bandwidth / weight bytes` steps per second.
//!
//! The report also carries what the memory target of a deployment is judged by: the process's
//! peak resident set (`VmHWM`, read at the end, so it covers loading and every measurement),
//! the bytes of the model's files, the weights' bytes in memory and the key/value cache the
//! largest measurement held. `--model` takes a Hugging Face directory or a `.gguf` file, whose
//! tokenizer files lie beside it (as the server reads them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::DType;

mod memory;

pub use memory::{model_file_bytes, peak_rss_bytes};

use crate::device::{DeviceError, DeviceSpec, parse_dtype};
use crate::engine::{EngineError, LlamaConfig, LlamaModel, SequenceStep};
use crate::generate_model::{GenerateModel, ModelShape, WeightDtype};
use crate::generation::{ActiveSequence, GenerationRequest};
use crate::rng::SplitMix64;
use crate::sampling::SamplingParams;
use crate::state::tokenizer_source_for;
use crate::tokenizer::{LlamaTokenizer, TokenizerSource};

/// Prompt tokens are drawn below this id: the Llama 3 vocabulary's ordinary tokens.
const ORDINARY_TOKENS: usize = 128_000;

/// Options of `bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["model", "shape"]))]
pub struct BenchArgs {
    /// Device to run on: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// A model directory in the Hugging Face layout (written by generate-model or fetch), or a
    /// llama.cpp `.gguf` file with the tokenizer files in its directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Generate a random-weight model of this shape instead (in a temporary directory).
    #[arg(long, value_enum)]
    pub shape: Option<ModelShape>,
    /// Seed of the generated model and of the prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Tokenizer files; defaults to the model's own (its directory; for a `.gguf` file the
    /// `tokenizer.json` beside it, else the file's tokenizer metadata), and for `--shape` to
    /// $LLAMA_SERVER_TOKENIZER_DIR.
    #[arg(long)]
    pub tokenizer_dir: Option<PathBuf>,
    /// Dtype to run in; defaults to f32 on the CPU and bf16 on a GPU (as `serve` does).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Element type of the key/value cache (f32, f16 or bf16); defaults to the server's
    /// `engine.kvCacheDtype: auto` choice for the model.
    #[arg(long, value_parser = parse_dtype)]
    pub kv_dtype: Option<DType>,
    /// Batch sizes to decode at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batch: Vec<usize>,
    /// Prompt length of every decoding sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps measured per run.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Prompt lengths to measure prefill and time to first token at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub prefill_tokens: Vec<usize>,
    /// Prompt tokens fed per forward step, shared by the prefilling sequences oldest first
    /// (the server's `prefillChunkTokens`, 512 by default).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk_tokens: usize,
    /// Measured runs of each line (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// The device's memory bandwidth in GB/s, for the share of the decode ceiling.
    #[arg(long)]
    pub bandwidth_gbs: Option<f64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid benchmark: {0}")]
    Invalid(String),
}

/// One line of results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Measurement {
    /// `prefill`, `time_to_first_token` or `decode`.
    pub metric: String,
    /// Sequences stepped together.
    pub batch: usize,
    /// Prompt tokens of each sequence.
    pub prompt_tokens: usize,
    /// Tokens processed (prefill) or generated (decode) in the measured interval, all sequences.
    pub tokens: usize,
    /// Median length of the measured interval.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_second: f64,
    /// Tokens per second of one sequence (decode: steps per second).
    pub per_stream_tokens_per_second: f64,
    /// Every measured run's interval, in the order run (the warm-up run excluded).
    pub runs_seconds: Vec<f64>,
    /// Share of the bandwidth ceiling (decode, with `--bandwidth-gbs`).
    pub ceiling_fraction: Option<f64>,
}

/// Everything a run measured, with what it ran on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub parameters: u64,
    /// Bytes of weights one decode step reads: the weights as held in memory (quantized blocks
    /// at their packed size).
    pub weight_bytes: u64,
    /// Bytes of the model's files on disk: the `.gguf` file, or a directory's safetensors.
    pub model_file_bytes: u64,
    /// Threads the CPU kernels run on (`RAYON_NUM_THREADS`, else the physical cores).
    pub threads: usize,
    /// The key/value cache's element type.
    pub kv_dtype: String,
    /// Bytes one token takes in the key/value cache.
    pub kv_bytes_per_token: u64,
    /// Tokens the largest measurement held in key/value caches at once, all sequences.
    pub kv_tokens: u64,
    /// `kv_tokens × kv_bytes_per_token`: the cache the largest measurement needed.
    pub kv_budget_bytes: u64,
    /// The process's peak resident set at the end of the run (Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    pub bandwidth_gbs: Option<f64>,
    /// `bandwidth / weight_bytes`: decode steps per second if memory were the only limit.
    pub ceiling_tokens_per_second: Option<f64>,
    pub repeats: usize,
    pub measurements: Vec<Measurement>,
}

/// Parameters of a Llama model of this configuration (a tied `lm_head` counted once).
pub fn parameter_count(config: &LlamaConfig) -> u64 {
    let hidden = config.hidden_size as u64;
    let head_dim = config.head_dim() as u64;
    let q = config.num_attention_heads as u64 * head_dim;
    let kv = config.kv_heads() as u64 * head_dim;
    let inter = config.intermediate_size as u64;
    let vocab = config.vocab_size as u64;
    let per_layer = 2 * hidden + 2 * q * hidden + 2 * kv * hidden + 3 * inter * hidden;
    let head = if config.tie_word_embeddings {
        0
    } else {
        vocab * hidden
    };
    vocab * hidden + config.num_hidden_layers as u64 * per_layer + hidden + head
}

impl BenchReport {
    /// The results as a table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "llama-server bench: {} ({:.3} B parameters, {:.3} GB in {}) on {} with {} threads; \
             median of {} runs",
            self.model,
            self.parameters as f64 / 1e9,
            self.weight_bytes as f64 / 1e9,
            self.dtype,
            self.device,
            self.threads,
            self.repeats
        );
        if let (Some(bandwidth), Some(ceiling)) =
            (self.bandwidth_gbs, self.ceiling_tokens_per_second)
        {
            let _ = writeln!(
                out,
                "bandwidth {bandwidth:.0} GB/s: decode ceiling {ceiling:.1} steps/s"
            );
        }
        let _ = writeln!(
            out,
            "{:<20} {:>5} {:>7} {:>7} {:>10} {:>11} {:>11} {:>9}",
            "metric", "batch", "prompt", "tokens", "seconds", "tokens/s", "per stream", "ceiling"
        );
        for m in &self.measurements {
            let ttft = m.metric == "time_to_first_token";
            let _ = writeln!(
                out,
                "{:<20} {:>5} {:>7} {:>7} {:>10.4} {:>11} {:>11} {:>9}",
                m.metric,
                m.batch,
                m.prompt_tokens,
                m.tokens,
                m.seconds,
                if ttft {
                    "-".to_owned()
                } else {
                    format!("{:.1}", m.tokens_per_second)
                },
                if m.metric == "decode" {
                    format!("{:.1}", m.per_stream_tokens_per_second)
                } else {
                    "-".to_owned()
                },
                m.ceiling_fraction
                    .map_or_else(|| "-".to_owned(), |f| format!("{:.1}%", 100.0 * f))
            );
        }
        let mb = |bytes: u64| bytes as f64 / 1e6;
        let _ = writeln!(
            out,
            "peak RSS {} MB; model files {:.0} MB, key/value cache {:.0} MB ({} tokens, {})",
            self.peak_rss_bytes
                .map_or_else(|| "unknown".to_owned(), |b| format!("{:.0}", mb(b))),
            mb(self.model_file_bytes),
            mb(self.kv_budget_bytes),
            self.kv_tokens,
            self.kv_dtype
        );
        out
    }
}

/// The directory the tokenizer files are read from: `--tokenizer-dir`, else the model
/// directory, or the directory holding a `.gguf` file.
/// The tokenizer `--tokenizer-dir` names, else the model's own as the server finds it
/// (`tokenizer.json` beside a `.gguf` file, else the file's tokenizer metadata).
fn tokenizer_source_of(args: &BenchArgs, model: &Path) -> Result<TokenizerSource, BenchError> {
    match &args.tokenizer_dir {
        Some(dir) => Ok(TokenizerSource::Dir(dir.clone())),
        None => tokenizer_source_for(model, None, None).map_err(BenchError::Invalid),
    }
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs) -> Result<BenchReport, BenchError> {
    if args.repeats == 0 || args.decode_tokens == 0 || args.batch.contains(&0) {
        return Err(BenchError::Invalid(
            "--repeats, --decode-tokens and every --batch must be at least 1".into(),
        ));
    }
    if args.prompt_tokens == 0 || args.prefill_tokens.contains(&0) || args.prefill_chunk_tokens == 0
    {
        return Err(BenchError::Invalid("prompts need at least 1 token".into()));
    }
    let device = args.device.open()?;
    let dtype = args.dtype.unwrap_or(args.device.default_dtype());
    let (dir, name, scratch) = match (&args.model, args.shape) {
        (Some(dir), _) => (dir.clone(), dir.display().to_string(), None),
        (None, Some(shape)) => {
            let tokenizer_dir = args
                .tokenizer_dir
                .clone()
                .or_else(|| std::env::var_os("LLAMA_SERVER_TOKENIZER_DIR").map(PathBuf::from))
                .ok_or_else(|| {
                    BenchError::Invalid(
                        "--shape needs --tokenizer-dir or LLAMA_SERVER_TOKENIZER_DIR".into(),
                    )
                })?;
            let out =
                std::env::temp_dir().join(format!("llama-bench-{}-{shape:?}", std::process::id()));
            let job = GenerateModel {
                shape,
                seed: args.seed,
                out: out.clone(),
                tokenizer_dir,
                dtype: if dtype == DType::F32 {
                    WeightDtype::F32
                } else {
                    WeightDtype::Bf16
                },
            };
            let generated = job.run();
            if let Err(err) = generated {
                let _ = std::fs::remove_dir_all(&out);
                return Err(err.into());
            }
            let name = clap::ValueEnum::to_possible_value(&shape)
                .map_or_else(|| format!("{shape:?}"), |v| v.get_name().to_owned());
            (out.clone(), name, Some(out))
        }
        (None, None) => return Err(BenchError::Invalid("give --model or --shape".into())),
    };
    let result = measure_all(args, &dir, &name, &device, dtype);
    if let Some(scratch) = scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    let report = result?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| BenchError::Invalid(format!("cannot serialize the report: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

fn measure_all(
    args: &BenchArgs,
    dir: &Path,
    name: &str,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<BenchReport, BenchError> {
    if !dir.exists() {
        return Err(BenchError::Invalid(format!(
            "model {}: no such file or directory",
            dir.display()
        )));
    }
    let mut model = LlamaModel::load(dir, dtype, device)?;
    if let Some(kv_dtype) = args.kv_dtype {
        model.set_kv_dtype(kv_dtype)?;
    }
    let tokenizer = LlamaTokenizer::load(&tokenizer_source_of(args, dir)?)?;
    let longest = args
        .prefill_tokens
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(decode_length(args));
    if longest >= model.context_length() {
        return Err(BenchError::Invalid(format!(
            "{longest} tokens do not fit the model's context of {}",
            model.context_length()
        )));
    }
    let parameters = parameter_count(model.config());
    let weight_bytes = model.weight_bytes();
    let ceiling = args
        .bandwidth_gbs
        .map(|gbs| gbs * 1e9 / weight_bytes as f64);
    let bench = Bench {
        model: &model,
        tokenizer: &tokenizer,
        seed: args.seed,
        chunk: args.prefill_chunk_tokens,
        vocab: model.config().vocab_size.min(ORDINARY_TOKENS),
    };
    let mut measurements = Vec::new();
    for &prompt in &args.prefill_tokens {
        let runs = timed_runs(args.repeats, || bench.prefill(prompt))?;
        let seconds = median(&runs);
        tracing::info!(prompt, seconds, "prefill measured");
        for metric in ["prefill", "time_to_first_token"] {
            let tokens = if metric == "prefill" { prompt } else { 1 };
            measurements.push(Measurement {
                metric: metric.into(),
                batch: 1,
                prompt_tokens: prompt,
                tokens,
                seconds,
                tokens_per_second: tokens as f64 / seconds,
                per_stream_tokens_per_second: tokens as f64 / seconds,
                runs_seconds: runs.clone(),
                ceiling_fraction: None,
            });
        }
    }
    for &batch in &args.batch {
        let runs = bench.decode(batch, args.prompt_tokens, args.decode_tokens, args.repeats)?;
        let seconds = median(&runs);
        tracing::info!(batch, seconds, "decode measured");
        let per_stream = args.decode_tokens as f64 / seconds;
        measurements.push(Measurement {
            metric: "decode".into(),
            batch,
            prompt_tokens: args.prompt_tokens,
            tokens: batch * args.decode_tokens,
            seconds,
            tokens_per_second: (batch * args.decode_tokens) as f64 / seconds,
            per_stream_tokens_per_second: per_stream,
            runs_seconds: runs,
            ceiling_fraction: ceiling.map(|c| per_stream / c),
        });
    }
    // Every decode sequence ends holding its prompt and every sampled token but the last; a
    // prefill holds its prompt.
    let kv_tokens = args
        .batch
        .iter()
        .map(|&batch| batch * (decode_length(args) - 1))
        .chain(args.prefill_tokens.iter().copied())
        .max()
        .unwrap_or(0) as u64;
    Ok(BenchReport {
        model: name.to_owned(),
        device: args.device.to_string(),
        dtype: format!("{dtype:?}").to_ascii_lowercase(),
        parameters,
        weight_bytes,
        model_file_bytes: model_file_bytes(dir).map_err(|source| BenchError::Io {
            path: dir.to_path_buf(),
            source,
        })?,
        threads: candle_core::utils::get_num_threads(),
        kv_dtype: format!("{:?}", model.kv_dtype()).to_ascii_lowercase(),
        kv_bytes_per_token: model.kv_bytes_per_token(),
        kv_tokens,
        kv_budget_bytes: kv_tokens * model.kv_bytes_per_token(),
        // Read last, so the peak covers loading and every measurement.
        peak_rss_bytes: peak_rss_bytes(),
        bandwidth_gbs: args.bandwidth_gbs,
        ceiling_tokens_per_second: ceiling,
        repeats: args.repeats,
        measurements,
    })
}

/// Tokens a decode sequence ends with: its prompt, the token its prefill samples, and the
/// tokens of the warm-up window and of every measured window.
fn decode_length(args: &BenchArgs) -> usize {
    args.prompt_tokens + 1 + (args.repeats + 1) * args.decode_tokens
}

/// Runs `measure` once to warm up, then `repeats` times; each measured run in seconds.
fn timed_runs(
    repeats: usize,
    mut measure: impl FnMut() -> Result<Duration, BenchError>,
) -> Result<Vec<f64>, BenchError> {
    measure()?;
    (0..repeats)
        .map(|_| measure().map(|d| d.as_secs_f64()))
        .collect()
}

/// The median of runs (the upper one of an even count); 0 for none.
fn median(runs: &[f64]) -> f64 {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

struct Bench<'a> {
    model: &'a LlamaModel,
    tokenizer: &'a LlamaTokenizer,
    seed: u64,
    /// Prompt tokens per step (`--prefill-chunk-tokens`).
    chunk: usize,
    vocab: usize,
}

impl<'a> Bench<'a> {
    /// A deterministic prompt of ordinary tokens.
    fn prompt(&self, index: usize, tokens: usize) -> Vec<u32> {
        let mut rng = SplitMix64::for_stream(self.seed, &format!("bench-prompt-{index}"));
        (0..tokens)
            .map(|_| (rng.next_u64() % self.vocab as u64) as u32)
            .collect()
    }

    fn sequence(
        &self,
        index: usize,
        prompt: usize,
        generate: usize,
    ) -> Result<ActiveSequence<'a>, BenchError> {
        let mut request = GenerationRequest::new(
            self.prompt(index, prompt),
            Some(generate),
            SamplingParams::greedy(),
        );
        // Random weights emit stop tokens at random; every run must decode the same count.
        request.ignore_eos = true;
        Ok(ActiveSequence::new(self.model, self.tokenizer, request)?)
    }

    /// One decode step of every sequence, as the engine thread runs it.
    fn step(&self, sequences: &mut [ActiveSequence<'a>]) -> Result<(), BenchError> {
        let mut steps: Vec<SequenceStep<'_>> = sequences.iter_mut().map(|s| s.step(1)).collect();
        let logits = self.model.forward(&mut steps)?;
        drop(steps);
        for (sequence, logits) in sequences.iter_mut().zip(&logits) {
            sequence.advance(logits)?;
        }
        Ok(())
    }

    /// Feeds every prompt as the engine thread does, at most `chunk` prompt tokens a step
    /// shared oldest first, until each prompt is in and its first token sampled.
    fn prefill_all(&self, sequences: &mut [ActiveSequence<'a>]) -> Result<(), BenchError> {
        while sequences.iter().any(ActiveSequence::in_prefill) {
            let mut budget = self.chunk;
            let mut fed = Vec::new();
            let mut steps = Vec::new();
            for sequence in sequences.iter_mut() {
                if budget == 0 {
                    break;
                }
                if sequence.in_prefill() {
                    let take = sequence.next_step_tokens(budget);
                    budget = budget.saturating_sub(take);
                    steps.push(sequence.step(take));
                    fed.push(true);
                } else {
                    fed.push(false);
                }
            }
            let logits = self.model.forward(&mut steps)?;
            drop(steps);
            let stepped = sequences
                .iter_mut()
                .zip(fed)
                .filter_map(|(sequence, fed)| fed.then_some(sequence));
            for (sequence, logits) in stepped.zip(&logits) {
                sequence.advance(logits)?;
            }
        }
        Ok(())
    }

    /// A `prompt`-token prompt until its first token is sampled.
    fn prefill(&self, prompt: usize) -> Result<Duration, BenchError> {
        let mut sequence = [self.sequence(0, prompt, 1)?];
        let started = Instant::now();
        self.prefill_all(&mut sequence)?;
        let elapsed = started.elapsed();
        if sequence[0].generated_tokens() != 1 {
            return Err(BenchError::Invalid("prefill sampled no token".into()));
        }
        Ok(elapsed)
    }

    /// `batch` sequences with `prompt`-token prompts, prefilled in chunks (not timed), then a
    /// warm-up window and `repeats` timed windows of `steps` decode steps each; the windows'
    /// seconds. (Prefilling once keeps long prompts at large batches affordable.)
    fn decode(
        &self,
        batch: usize,
        prompt: usize,
        steps: usize,
        repeats: usize,
    ) -> Result<Vec<f64>, BenchError> {
        let generate = 1 + (repeats + 1) * steps;
        let mut sequences = (0..batch)
            .map(|i| self.sequence(i, prompt, generate))
            .collect::<Result<Vec<_>, _>>()?;
        self.prefill_all(&mut sequences)?;
        let mut window = || -> Result<f64, BenchError> {
            let started = Instant::now();
            for _ in 0..steps {
                self.step(&mut sequences)?;
            }
            Ok(started.elapsed().as_secs_f64())
        };
        window()?;
        let runs = (0..repeats)
            .map(|_| window())
            .collect::<Result<Vec<_>, _>>()?;
        if sequences.iter().any(|s| s.generated_tokens() != generate) {
            return Err(BenchError::Invalid(
                "a sequence stopped before the measured steps ended".into(),
            ));
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Llama 3.2 1B: 1.236 B parameters; Llama 3.1 8B: 8.030 B.
        let billions = |shape: ModelShape| parameter_count(&shape.config()) as f64 / 1e9;
        assert!((billions(ModelShape::Llama32_1b) - 1.236).abs() < 0.001);
        assert!((billions(ModelShape::Llama31_8b) - 8.030).abs() < 0.001);
    }

    #[test]
    fn the_median_skips_the_warm_up_run() {
        let mut runs = [5.0, 1.0, 3.0, 2.0].into_iter();
        let measured = timed_runs(3, || {
            Ok(Duration::from_secs_f64(runs.next().unwrap_or(f64::NAN)))
        });
        let measured = measured.ok().unwrap_or_default();
        assert_eq!(measured, [1.0, 3.0, 2.0]);
        assert_eq!(median(&measured), 2.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn a_gguf_file_reads_its_tokenizer_beside_it_unless_one_is_named() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let scratch = tempfile::tempdir().expect("tempdir");
        let file = scratch.path().join("model.gguf");
        std::fs::write(&file, b"").expect("write");
        std::fs::write(scratch.path().join("tokenizer.json"), b"{}").expect("write");
        let dir = |path: &Path| TokenizerSource::Dir(path.to_path_buf());
        let args = Cli::parse_from(["bench", "--model", "x"]).bench;
        let source = |model: &Path| tokenizer_source_of(&args, model).expect("source");
        assert_eq!(source(&file), dir(scratch.path()));
        assert_eq!(source(scratch.path()), dir(scratch.path()));
        let args = Cli::parse_from(["bench", "--model", "x", "--tokenizer-dir", "/t"]).bench;
        let source = tokenizer_source_of(&args, &file).expect("source");
        assert_eq!(source, dir(Path::new("/t")));
    }
}
