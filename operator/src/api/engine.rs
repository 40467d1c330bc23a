//! `spec.engine`: the inference engine's limits on each instance.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The inference engine's limits on each instance: the context window it serves, the size and
/// element type of its key/value cache, how many sequences decode together and how many
/// requests may wait. Every field is optional. Changing one restarts the instances (one at a
/// time) with the new configuration.
///
/// The key/value cache holds every running sequence's keys and values. Its budget, in tokens,
/// is what admission control counts: a request reserves its prompt plus its `max_tokens`, and
/// waits (or gets 429 once `maxQueue` requests wait) while the running ones hold the budget.
/// When `kvCacheTokens` is unset the operator sizes the budget to fit in the instance's GPU
/// memory beside the model's 16-bit weights (see `status.engine`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.kvCacheTokens) || !has(self.contextLength) || self.kvCacheTokens >= self.contextLength").message("spec.engine.kvCacheTokens must be at least spec.engine.contextLength: one request filling the context window must fit in the key/value cache; raise kvCacheTokens or lower contextLength").field_path(".kvCacheTokens")
)]
pub struct EngineSpec {
    /// The context window each instance serves, in tokens: prompt and completion together. A
    /// request whose prompt leaves no room for one token is refused with 400; a completion
    /// stops at the window (`finish_reason: length`). At most the model's own context length
    /// (131072 for Llama 3.1 and 3.2), which is the default. Lower it to serve more requests
    /// in the same key/value cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1048576))]
    pub context_length: Option<i64>,

    /// The key/value cache budget of each instance, in tokens summed over the running
    /// sequences. Defaults to four context windows (at least 65536 tokens), lowered to what
    /// fits in the instance's GPU memory beside the weights. A value that does not fit is
    /// reported in the Ready condition (reason KvCacheDoesNotFit) with the most that does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 67108864))]
    pub kv_cache_tokens: Option<i64>,

    /// The element type of the key/value cache: `auto` (the default; 16-bit for weights stored
    /// at 16 bits or fewer, which is every supported GPU deployment), `f16` or `f32`. `f32`
    /// doubles the cache's memory per token, so fewer tokens fit.
    #[serde(default)]
    pub kv_cache_dtype: KvCacheDtype,

    /// The most sequences that decode together in one batch. Defaults to 16. Larger batches
    /// raise throughput and each request's time per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: Option<i32>,

    /// The most requests that wait for a place in the batch; beyond it callers get 429 and
    /// should retry. Defaults to 64. 0 refuses every request that cannot start at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_queue: Option<i32>,

    /// The most prompt tokens one engine step processes (chunked prefill), so that a long
    /// prompt does not stall the sequences decoding beside it. Defaults to 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub prefill_chunk_tokens: Option<i32>,

    /// Keep the keys and values of finished requests in the key/value cache's free room, so
    /// that a prompt starting with tokens seen before (a conversation's earlier turns, a
    /// system prompt shared by many requests) computes only the rest: a much shorter time to
    /// first token for chat. Kept entries give way, least recently used first, whenever a
    /// request needs their room, so they never delay one. A reused prompt gives the same
    /// answer as without the cache; a reused earlier answer was computed token by token, which
    /// rounds slightly differently. `usage.prompt_tokens_details.cached_tokens` says how many
    /// prompt tokens were reused. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<bool>,
}

/// The element type of the key/value cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    #[default]
    Auto,
    F16,
    F32,
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F16 => "f16",
            Self::F32 => "f32",
        })
    }
}

impl KvCacheDtype {
    /// How many times the 16-bit size each token's keys and values take.
    pub fn width_factor(self) -> u64 {
        match self {
            Self::Auto | Self::F16 => 1,
            Self::F32 => 2,
        }
    }
}
