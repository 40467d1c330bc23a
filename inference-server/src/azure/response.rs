//! Response bodies: chat completions, stream chunks, `/info`, `/v1/models`.

use serde::Serialize;
use serde_json::Value;

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// OpenAI's breakdown of the prompt tokens (clients that do not know it ignore it).
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache instead of being
    /// computed (with `n` > 1, the most any choice reused).
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails::default(),
        }
    }

    /// The same counts, `cached` of the prompt tokens from the prefix cache.
    pub fn with_cached(mut self, cached: usize) -> Self {
        self.prompt_tokens_details.cached_tokens = cached.min(self.prompt_tokens);
        self
    }
}

/// A tool call the model made (Llama 3.1 JSON tool calling).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as OpenAI clients expect.
    pub arguments: String,
}

/// The assistant's message in a non-streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseMessage {
    pub role: &'static str,
    pub content: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// OpenAI-style logprobs of one choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprobEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub index: usize,
    pub message: ResponseMessage,
    pub finish_reason: &'static str,
    pub logprobs: Option<ChoiceLogprobs>,
}

/// `object: chat.completion`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<ChoiceLogprobs>,
}

/// `object: chat.completion.chunk`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `GET /info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub model_name: String,
    pub model_type: &'static str,
    pub model_provider_name: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}
