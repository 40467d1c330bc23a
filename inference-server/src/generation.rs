//! Text generation: prompt tokens in, completion out, for one sequence or a batch that runs
//! in lockstep (sequences leave the batch as they finish).

use candle_core::Tensor;

use crate::engine::error::{EngineError, Result};
use crate::engine::{KvCache, LlamaModel, LogitsFor, SequenceStep};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop_strings::StopStrings;
use crate::tokenizer::{LlamaTokenizer, TextStream};

/// One completion to produce.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (already templated and encoded).
    pub prompt: Vec<u32>,
    /// Most tokens to generate; `None` means until the context window is full.
    pub max_tokens: Option<usize>,
    /// Strings that end the completion; never part of the returned text.
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
}

/// Why a completion ended, in the API's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    /// Every sampled token, including a final stop token.
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// `token_ids.len()`.
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

/// Generates one completion.
pub fn generate(
    model: &LlamaModel,
    tokenizer: &LlamaTokenizer,
    request: GenerationRequest,
) -> Result<Completion> {
    let mut completions = generate_batch(model, tokenizer, vec![request])?;
    completions
        .pop()
        .ok_or_else(|| EngineError::InvalidInput("no completion produced".into()))
}

/// Generates the completions of several requests together: each step runs one forward pass
/// over every unfinished sequence, each with its own positions and cache.
pub fn generate_batch(
    model: &LlamaModel,
    tokenizer: &LlamaTokenizer,
    requests: Vec<GenerationRequest>,
) -> Result<Vec<Completion>> {
    let mut sequences = requests
        .into_iter()
        .map(|request| ActiveSequence::new(model, tokenizer, request))
        .collect::<Result<Vec<_>>>()?;
    loop {
        let mut running: Vec<&mut ActiveSequence<'_>> =
            sequences.iter_mut().filter(|s| !s.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        let mut steps: Vec<SequenceStep<'_>> = running.iter_mut().map(|s| s.step()).collect();
        let logits = model.forward(&mut steps)?;
        drop(steps);
        for (sequence, logits) in running.into_iter().zip(logits) {
            sequence.advance(&logits, model.context_length())?;
        }
    }
    Ok(sequences
        .into_iter()
        .map(ActiveSequence::into_completion)
        .collect())
}

/// One sequence while it generates: what a scheduler drives step by step. Each step it hands
/// [`ActiveSequence::step`] to a batched [`LlamaModel::forward`] (next to any other sequences)
/// and gives the resulting logits back to [`ActiveSequence::advance`].
pub struct ActiveSequence<'t> {
    tokenizer: &'t LlamaTokenizer,
    cache: KvCache,
    sampler: Sampler,
    stream: TextStream<'t>,
    stops: StopStrings,
    /// Tokens to feed at the next step: the prompt, then the last sampled token.
    input: Vec<u32>,
    prompt_tokens: usize,
    max_tokens: usize,
    generated: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

impl std::fmt::Debug for ActiveSequence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveSequence")
            .field("prompt_tokens", &self.prompt_tokens)
            .field("generated", &self.generated.len())
            .field("finish", &self.finish)
            .finish_non_exhaustive()
    }
}

impl<'t> ActiveSequence<'t> {
    /// Validates the request and prepares an empty cache; nothing runs yet.
    pub fn new(
        model: &LlamaModel,
        tokenizer: &'t LlamaTokenizer,
        request: GenerationRequest,
    ) -> Result<Self> {
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt has no tokens".into()));
        }
        let context = model.context_length();
        // At least one token must fit after the prompt.
        if request.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: request.prompt.len(),
                context,
            });
        }
        let room = context - request.prompt.len();
        let max_tokens = request.max_tokens.map_or(room, |m| m.min(room));
        let finish = (max_tokens == 0).then_some(FinishReason::Length);
        Ok(Self {
            tokenizer,
            cache: model.new_cache(),
            sampler: Sampler::new(request.sampling)?,
            stream: tokenizer.decode_stream(),
            stops: StopStrings::new(&request.stop),
            prompt_tokens: request.prompt.len(),
            input: request.prompt,
            max_tokens,
            generated: Vec::new(),
            text: String::new(),
            finish,
        })
    }

    /// This sequence's part of the next forward step: the prompt first, then its last token.
    pub fn step(&mut self) -> SequenceStep<'_> {
        SequenceStep {
            tokens: &self.input,
            cache: &mut self.cache,
            logits: LogitsFor::Last,
        }
    }

    /// Whether the sequence has finished and should leave the batch.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Samples from this step's logits (`[1, vocab]`), decides whether the sequence is done and
    /// returns the text that became final with this token (possibly empty; streamable).
    pub fn advance(&mut self, logits: &Tensor, context: usize) -> Result<String> {
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let token = self.sampler.sample(&logits)?;
        self.generated.push(token);
        let mut emitted = String::new();
        if self.tokenizer.is_stop(token) {
            self.finish = Some(FinishReason::Stop);
        } else {
            let piece = self.stream.push(token)?;
            let check = self.stops.push(&piece);
            emitted = check.emit;
            if check.stopped {
                self.finish = Some(FinishReason::Stop);
            } else if self.generated.len() >= self.max_tokens
                || self.prompt_tokens + self.generated.len() >= context
            {
                self.finish = Some(FinishReason::Length);
            }
        }
        if self.finish.is_some() {
            // Text held back as a possible stop-string start is real output when no stop
            // string completed (after a stop string the matcher holds nothing).
            emitted.push_str(&self.stops.finish());
        }
        self.text.push_str(&emitted);
        self.input = vec![token];
        Ok(emitted)
    }

    /// The finished completion (a sequence stopped early reports `length`).
    pub fn into_completion(self) -> Completion {
        Completion {
            text: self.text,
            completion_tokens: self.generated.len(),
            token_ids: self.generated,
            prompt_tokens: self.prompt_tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
        }
    }
}
