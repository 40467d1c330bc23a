//! What every handler shares: configuration, the engine once loaded, authentication, limits,
//! content safety, metrics and the draining flag.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::Authenticator;
use crate::chat_template::ChatTemplate;
use crate::content_safety::ContentFilter;
use crate::engine::gguf::{GgufFile, check_file_type, has_tokenizer, split_prefix};
use crate::engine::{LlamaConfig, LlamaModel};
use crate::generate_model::{GenerateModel, ModelShape, WeightDtype};
use crate::llama_guard::LlamaGuard;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::scheduler::{EngineHandle, SchedulerLimits};
use crate::server_config::ServerConfig;
use crate::tokenizer::{LlamaTokenizer, TokenizerSource};

/// The loaded model and what turns messages into its tokens.
#[derive(Debug)]
pub struct Engine {
    pub handle: EngineHandle,
    pub tokenizer: Arc<LlamaTokenizer>,
    pub template: ChatTemplate,
}

/// Shared state of the HTTP application.
#[derive(Debug)]
pub struct AppState {
    pub config: ServerConfig,
    pub engine: OnceLock<Engine>,
    pub auth: Authenticator,
    pub limiter: RateLimiter,
    pub filter: Option<ContentFilter>,
    /// The Llama Guard classifier, when configured (loaded before the engine).
    pub guard: OnceLock<LlamaGuard>,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Unix seconds the server started (the `created` of `/v1/models`).
    pub started: u64,
}

impl AppState {
    pub fn new(config: ServerConfig, auth: Authenticator) -> Arc<Self> {
        let limiter = RateLimiter::new(
            config.rate_limits.requests_per_minute,
            config.rate_limits.tokens_per_minute,
        );
        let filter = config
            .content_safety
            .enabled
            .then(|| ContentFilter::new(&config.content_safety.blocklist));
        Arc::new(Self {
            config,
            engine: OnceLock::new(),
            auth,
            limiter,
            filter,
            guard: OnceLock::new(),
            metrics: Metrics::new(),
            draining: AtomicBool::new(false),
            started: unix_now(),
        })
    }

    /// The engine, when loaded.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.get()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Loads the model described by the configuration (generating the demo model first when
    /// asked) and starts the engine thread. Blocking: run it off the async runtime.
    pub fn load_engine(&self) -> Result<(), String> {
        if self.config.content_safety.enabled
            && let Some(guard) = &self.config.content_safety.llama_guard
        {
            let gauges = crate::metrics::Metrics::new().engine.clone();
            let guard = LlamaGuard::load(&guard.model_path, gauges)?;
            let _ = self.guard.set(guard);
        }
        let dir = model_dir(&self.config)?;
        // A GGUF file's header (its vocabulary is most of it) is read once, for the weight
        // type, the tokenizer and the model.
        let gguf = if dir.is_file() {
            Some(GgufFile::open(&dir).map_err(|e| e.to_string())?)
        } else {
            None
        };
        if let (Some(expected), Some(file)) = (&self.config.weight_type, &gguf) {
            check_file_type(file, expected).map_err(|e| e.to_string())?;
        }
        let source = tokenizer_source_with(
            &dir,
            self.config.tokenizer_dir.as_deref(),
            bundled_tokenizer_dir().as_deref(),
            gguf.as_ref(),
        )?;
        tracing::info!(tokenizer = %source, "tokenizer");
        let tokenizer = match (&source, &gguf) {
            (TokenizerSource::Gguf(_), Some(file)) => LlamaTokenizer::from_gguf_file(file),
            _ => LlamaTokenizer::load(&source),
        }
        .map_err(|e| e.to_string())?;
        let template = ChatTemplate::from_tokenizer(&tokenizer).map_err(|e| e.to_string())?;
        // `serve` has already resolved --device / $LLAMA_SERVER_DEVICE into the configuration.
        let spec = crate::device::DeviceSpec::choose(None, None, self.config.device.as_deref())
            .map_err(|e| e.to_string())?;
        let devices = spec
            .open_several(self.config.gpu_count())
            .map_err(|e| e.to_string())?;
        // Split over several GPUs, each one's layers hold their share of the key/value budget
        // too, so the split balances both.
        let budget = |model: &LlamaConfig| {
            kv_budget(
                &self.config,
                served_context(&self.config, model.max_position_embeddings),
            )
        };
        let dtype = spec.default_dtype();
        let mut model = match gguf {
            Some(file) => LlamaModel::load_gguf_file(file, dtype, &devices, budget),
            None => LlamaModel::load_on(&dir, dtype, &devices, budget),
        }
        .map_err(|e| e.to_string())?;
        if devices.len() > 1 {
            tracing::info!(
                gpus = devices.len(),
                layers = ?model.placement().layer_counts(),
                "decoder layers split over the GPUs (the first also holds the embedding and output)"
            );
        }
        if let Some(dtype) = self.config.engine.kv_cache_dtype.chosen() {
            model
                .set_kv_dtype(dtype)
                .map_err(|e| format!("engine.kvCacheDtype: {e}"))?;
        }
        tracing::info!(
            kv_cache_dtype = ?model.kv_dtype(),
            kv_bytes_per_token = model.kv_bytes_per_token(),
            "key/value cache"
        );
        let context = served_context(&self.config, model.context_length());
        let engine = &self.config.engine;
        let limits = SchedulerLimits {
            context_tokens: context,
            max_batch_size: engine.max_batch_size,
            kv_cache_tokens: kv_budget(&self.config, context),
            max_queue: engine.max_queue,
            prefill_chunk_tokens: engine.prefill_chunk_tokens,
            prefix_cache: engine.prefix_cache,
        };
        self.metrics
            .engine
            .kv_budget_tokens
            .set(limits.kv_cache_tokens as i64);
        let token_bytes = model.kv_bytes_per_token();
        self.metrics
            .engine
            .kv_token_bytes
            .set(i64::try_from(token_bytes).unwrap_or(i64::MAX));
        let tokenizer = Arc::new(tokenizer);
        let handle = EngineHandle::start(
            model,
            Arc::clone(&tokenizer),
            limits,
            self.metrics.engine.clone(),
        )
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        let _ = self.engine.set(Engine {
            handle,
            tokenizer,
            template,
        });
        self.metrics.model_loaded.set(1);
        Ok(())
    }
}

/// The context window served: `contextLength`, at most the model's (`model_context`).
fn served_context(config: &ServerConfig, model_context: usize) -> usize {
    config
        .context_length
        .map_or(model_context, |c| c.min(model_context))
}

/// The key/value budget in tokens: `engine.kvCacheTokens`, else four context windows (at least
/// 65,536 tokens).
fn kv_budget(config: &ServerConfig, context: usize) -> usize {
    config
        .engine
        .kv_cache_tokens
        .unwrap_or_else(|| (4 * context).max(65_536))
}

/// The Hugging Face directory or the GGUF file to load.
fn model_dir(config: &ServerConfig) -> Result<PathBuf, String> {
    if config.model_path != "demo" {
        let path = PathBuf::from(&config.model_path);
        if !path.exists() {
            return Err(format!(
                "modelPath {}: no such file or directory (a Hugging Face model directory or a \
                 .gguf file; under the operator, spec.source.pvc.path names it on the claim)",
                path.display()
            ));
        }
        // `LlamaModel::load` reads a file as GGUF and a directory as safetensors.
        if config.format.as_deref() == Some("gguf") && path.is_dir() {
            return single_gguf_in(&path);
        }
        return Ok(path);
    }
    let tokenizer_dir = tokenizer_fallback(config).ok_or_else(|| {
        "modelPath is 'demo' but no tokenizer is configured: set tokenizerDir in the \
             configuration or LLAMA_SERVER_TOKENIZER_DIR"
            .to_owned()
    })?;
    let seed = config.engine.demo_seed;
    let out = std::env::temp_dir().join(format!("llama-server-demo-v2-{seed}"));
    if !out.join("config.json").exists() {
        // Written aside and renamed into place, so servers starting together never load a
        // half-written model.
        static ATTEMPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let scratch = std::env::temp_dir().join(format!(
            "llama-server-demo-{seed}.{}-{}.partial",
            std::process::id(),
            ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let job = GenerateModel {
            shape: ModelShape::Tiny,
            seed,
            out: scratch.clone(),
            tokenizer_dir,
            dtype: WeightDtype::F32,
        };
        job.run()
            .map_err(|e| format!("cannot generate the demo model: {e}"))?;
        install_tool_template(&scratch)?;
        if std::fs::rename(&scratch, &out).is_err() {
            // Another server won the race; its model is the same.
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    Ok(out)
}

/// The demo model's chat template: Llama 3.1's conversation format with JSON tool calling
/// (the npm tokenizer package carries the plain Llama 3 template, which has no tools).
const DEMO_CHAT_TEMPLATE: &str = include_str!("templates/llama-3.1-tools.jinja");

fn install_tool_template(dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    config["chat_template"] = serde_json::Value::String(DEMO_CHAT_TEMPLATE.to_owned());
    std::fs::write(&path, config.to_string())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The one `*.gguf` file in `dir`: `llama-server fetch` saves a URL's GGUF file, or a GGUF-only
/// Hugging Face repository's file, into the model directory under its own name, so a directory is
/// accepted for the gguf format when it holds exactly one, or the parts of one split file (the
/// first part is returned; it opens the others).
pub fn single_gguf_in(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "modelPath {}: cannot list the directory: {e}",
            dir.display()
        )
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            format!(
                "modelPath {}: cannot list the directory: {e}",
                dir.display()
            )
        })?;
        let path = entry.path();
        let is_gguf = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"));
        if is_gguf && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    // The parts of one split file (`NAME-00001-of-00003.gguf`, …) are one model: its first part
    // opens the rest.
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let prefixes: Vec<Option<String>> = found
        .iter()
        .map(|p| split_prefix(&name(p)).map(str::to_owned))
        .collect();
    if found.len() > 1 && prefixes[0].is_some() && prefixes.iter().all(|p| *p == prefixes[0]) {
        return Ok(found[0].clone());
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "modelPath {}: the format is gguf but the directory holds no .gguf file; \
             name the .gguf file in modelPath or put exactly one in the directory",
            dir.display()
        )),
        many => Err(format!(
            "modelPath {}: the format is gguf and the directory holds {} .gguf files ({}); \
             name the one to serve in modelPath",
            dir.display(),
            many.len(),
            many.iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The tokenizer directory to fall back on: `tokenizerDir` in the configuration, else
/// `$LLAMA_SERVER_TOKENIZER_DIR` (the images set it to the bundled Llama 3.1 tokenizer).
fn tokenizer_fallback(config: &ServerConfig) -> Option<PathBuf> {
    config.tokenizer_dir.clone().or_else(bundled_tokenizer_dir)
}

/// `$LLAMA_SERVER_TOKENIZER_DIR`: the images' bundled Llama 3.1 tokenizer.
fn bundled_tokenizer_dir() -> Option<PathBuf> {
    std::env::var_os("LLAMA_SERVER_TOKENIZER_DIR").map(PathBuf::from)
}

/// Where the tokenizer of `model` comes from. A model directory carries its own. A GGUF file
/// takes, in this order: the `tokenizer.json` beside it; the `configured` directory
/// (`tokenizerDir`); the tokenizer in its own metadata; the `bundled` directory
/// (`$LLAMA_SERVER_TOKENIZER_DIR`). So a single `.gguf` downloaded from a URL serves with its
/// own vocabulary and chat template, and one without tokenizer metadata with the bundled
/// Llama 3.1 tokenizer.
pub fn tokenizer_source_for(
    model: &Path,
    configured: Option<&Path>,
    bundled: Option<&Path>,
) -> Result<TokenizerSource, String> {
    tokenizer_source_with(model, configured, bundled, None)
}

/// [`tokenizer_source_for`], with the GGUF file `model` already opened where it is one.
fn tokenizer_source_with(
    model: &Path,
    configured: Option<&Path>,
    bundled: Option<&Path>,
    opened: Option<&GgufFile>,
) -> Result<TokenizerSource, String> {
    let Some(beside) = model.parent().filter(|_| model.is_file()) else {
        return Ok(TokenizerSource::Dir(model.to_path_buf()));
    };
    let beside = if beside.as_os_str().is_empty() {
        Path::new(".")
    } else {
        beside
    };
    if beside.join("tokenizer.json").is_file() {
        return Ok(TokenizerSource::Dir(beside.to_path_buf()));
    }
    if let Some(dir) = configured {
        if dir.join("tokenizer.json").is_file() {
            return Ok(TokenizerSource::Dir(dir.to_path_buf()));
        }
        return Err(format!(
            "no tokenizer for {}: the tokenizer directory {} (tokenizerDir) holds no \
             tokenizer.json",
            model.display(),
            dir.display()
        ));
    }
    let carries_tokenizer = match opened {
        Some(file) => has_tokenizer(file),
        None => has_tokenizer(&GgufFile::open(model).map_err(|e| e.to_string())?),
    };
    if carries_tokenizer {
        return Ok(TokenizerSource::Gguf(model.to_path_buf()));
    }
    match bundled {
        Some(dir) if dir.join("tokenizer.json").is_file() => {
            Ok(TokenizerSource::Dir(dir.to_path_buf()))
        }
        Some(dir) => Err(format!(
            "no tokenizer for {}: it carries no tokenizer metadata, and neither {} nor the \
             tokenizer directory {} (LLAMA_SERVER_TOKENIZER_DIR) holds tokenizer.json",
            model.display(),
            beside.display(),
            dir.display()
        )),
        None => Err(format!(
            "no tokenizer for {}: it carries no tokenizer metadata, {} holds no tokenizer.json \
             and no tokenizer directory is configured (set tokenizerDir in the configuration \
             or LLAMA_SERVER_TOKENIZER_DIR)",
            model.display(),
            beside.display()
        )),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
