//! Prometheus metrics of the server (`GET /metrics`, text exposition format).
//!
//! Everything is named `llama_server_*`. The engine thread updates [`EngineGauges`]; the HTTP
//! layer updates the request, token and rejection counters.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `requests`, `tokens` or `queue`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// `prompt` or `completion`.
    pub stage: &'static str,
}

/// What the engine thread publishes.
#[derive(Clone, Debug)]
pub struct EngineGauges {
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub kv_reserved_tokens: Gauge,
    pub kv_cached_tokens: Gauge,
    pub kv_budget_tokens: Gauge,
    /// Bytes one token takes in the KV cache (the model's shape and the cache's dtype).
    pub kv_token_bytes: Gauge,
    pub queue_seconds: Histogram,
    pub step_seconds: Histogram,
    pub step_tokens: Counter,
    /// Tokens held by the prefix cache's entries.
    pub prefix_cache_tokens: Gauge,
    /// Rows (tokens) the key/value pool has allocated: its memory is this × token bytes.
    pub kv_pool_tokens: Gauge,
    /// Prompt tokens of sequences admitted while the prefix cache is on.
    pub prefix_prompt_tokens: Counter,
    /// Of those, the tokens whose keys and values came from the prefix cache.
    pub prefix_hit_tokens: Counter,
}

/// Every metric of the server and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub in_flight: Gauge,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_seconds: Histogram,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub content_filtered: Family<StageLabels, Counter>,
    pub content_safety_errors: Counter,
    pub model_loaded: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub engine: EngineGauges,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("llama_server");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Chat completion requests being served, queued ones included",
            in_flight.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens of served requests",
            prompt_tokens.clone(),
        );
        let completion_tokens = Counter::default();
        registry.register(
            "completion_tokens",
            "Generated tokens",
            completion_tokens.clone(),
        );
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "time_to_first_token_seconds",
            "From request arrival to the first generated token",
            time_to_first_token.clone(),
        );
        let time_per_output_token = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "time_per_output_token_seconds",
            "Mean time between generated tokens of a request, after the first",
            time_per_output_token.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Chat completion latency, end to end",
            request_seconds.clone(),
        );
        let rate_limited = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests answered 429, by the limit that was hit",
            rate_limited.clone(),
        );
        let content_filtered = Family::<StageLabels, Counter>::default();
        registry.register(
            "content_filtered",
            "Prompts and completions flagged by content safety",
            content_filtered.clone(),
        );
        let content_safety_errors = Counter::default();
        registry.register(
            "content_safety_errors",
            "Texts the Llama Guard classifier could not judge",
            content_safety_errors.clone(),
        );
        let model_loaded = Gauge::default();
        registry.register(
            "model_loaded",
            "1 once the model is loaded and the server is ready",
            model_loaded.clone(),
        );
        let engine = EngineGauges {
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_reserved_tokens: Gauge::default(),
            kv_cached_tokens: Gauge::default(),
            kv_budget_tokens: Gauge::default(),
            kv_token_bytes: Gauge::default(),
            queue_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            step_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            step_tokens: Counter::default(),
            prefix_cache_tokens: Gauge::default(),
            kv_pool_tokens: Gauge::default(),
            prefix_prompt_tokens: Counter::default(),
            prefix_hit_tokens: Counter::default(),
        };
        registry.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            engine.queue_depth.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            engine.running.clone(),
        );
        registry.register(
            "kv_cache_reserved_tokens",
            "KV-cache tokens reserved by running sequences (prompt plus max_tokens)",
            engine.kv_reserved_tokens.clone(),
        );
        registry.register(
            "kv_cache_used_tokens",
            "KV-cache tokens holding keys and values now",
            engine.kv_cached_tokens.clone(),
        );
        registry.register(
            "kv_cache_budget_tokens",
            "The KV-cache budget in tokens",
            engine.kv_budget_tokens.clone(),
        );
        registry.register(
            "kv_cache_token_bytes",
            "Bytes one token takes in the KV cache: keys and values of every layer, in the \
             cache's dtype (engine.kvCacheDtype)",
            engine.kv_token_bytes.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time requests waited for a batch slot",
            engine.queue_seconds.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Duration of one batched forward step",
            engine.step_seconds.clone(),
        );
        registry.register(
            "step_tokens",
            "Tokens processed by forward steps (prompt and generated)",
            engine.step_tokens.clone(),
        );
        registry.register(
            "prefix_cache_tokens",
            "KV-cache tokens kept by the prefix cache for prompts that start the same way \
             (evicted whenever an admission needs the room)",
            engine.prefix_cache_tokens.clone(),
        );
        registry.register(
            "kv_cache_allocated_tokens",
            "Tokens the KV cache has memory for (free or not); its memory is this times \
             kv_cache_token_bytes. It grows to the budget, past it only when running \
             sequences' scattered rows leave no run long enough",
            engine.kv_pool_tokens.clone(),
        );
        registry.register(
            "prefix_cache_prompt_tokens",
            "Prompt tokens of requests admitted while the prefix cache is on",
            engine.prefix_prompt_tokens.clone(),
        );
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache (a kept entry or \
             a running sequence) instead of being computed",
            engine.prefix_hit_tokens.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            in_flight,
            prompt_tokens,
            completion_tokens,
            time_to_first_token,
            time_per_output_token,
            request_seconds,
            rate_limited,
            content_filtered,
            content_safety_errors,
            model_loaded,
            engine,
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// Counts a prompt or completion flagged by content safety.
    pub fn count_filtered(&self, stage: &'static str) {
        self.content_filtered
            .get_or_create(&StageLabels { stage })
            .inc();
    }

    /// Counts a request refused with 429 by `limit` (`requests`, `tokens` or `queue`).
    pub fn count_rate_limited(&self, limit: &'static str) {
        self.rate_limited
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Counts one answered request.
    pub fn count_request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
    }
}
