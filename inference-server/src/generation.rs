//! Text generation: prompt tokens in, completion out, for one sequence or a batch that runs
//! in lockstep (sequences leave the batch as they finish).

use candle_core::{DType, Tensor};

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
    /// Token ids that end the completion besides the model's stop tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's stop tokens (until `max_tokens` or the context).
    pub ignore_eos: bool,
    /// Leave special tokens out of the text (the default).
    pub skip_special_tokens: bool,
    /// Report each sampled token's log-probability with this many most likely alternatives;
    /// `None` reports nothing.
    pub logprobs: Option<usize>,
}

impl GenerationRequest {
    /// A request with the API's defaults for everything but the prompt and length.
    pub fn new(prompt: Vec<u32>, max_tokens: Option<usize>, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            stop: Vec::new(),
            sampling,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            logprobs: None,
        }
    }
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
    /// Prompt tokens whose keys and values were copied from the prefix cache instead of
    /// computed.
    pub cached_tokens: usize,
    /// Sum of the sampled tokens' log-probabilities under the model, when the request asked
    /// for `logprobs` (a `best_of` ranking asks for them); 0 otherwise, since the full
    /// softmax over the vocabulary costs about as much per token as a small model's step.
    pub cumulative_logprob: f64,
}

/// A sampled token's log-probability and, when asked for, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one decode step produced for a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub token: u32,
    /// Text that became final with this token (possibly empty; streamable).
    pub text: String,
    /// Present when the request asked for logprobs.
    pub logprob: Option<TokenLogprob>,
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
        let mut steps: Vec<SequenceStep<'_>> =
            running.iter_mut().map(|s| s.step(usize::MAX)).collect();
        let logits = model.forward(&mut steps)?;
        drop(steps);
        for (sequence, logits) in running.into_iter().zip(logits) {
            sequence.advance(&logits)?;
        }
    }
    Ok(sequences
        .into_iter()
        .map(ActiveSequence::into_completion)
        .collect())
}

/// One sequence while it generates: what a scheduler drives step by step. Each step it hands
/// [`ActiveSequence::step`] to a batched [`LlamaModel::forward`] (next to any other sequences)
/// and gives the resulting logits back to [`ActiveSequence::advance`]. The prompt may be fed
/// in chunks (chunked prefill); sampling starts once all of it is in the cache.
pub struct ActiveSequence<'t> {
    tokenizer: &'t LlamaTokenizer,
    cache: KvCache,
    sampler: Sampler,
    stream: TextStream<'t>,
    stops: StopStrings,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Prompt tokens whose keys and values came from another cache (a reused prefix).
    reused: usize,
    /// Tokens handed to the current step.
    input: Vec<u32>,
    context: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    generated: Vec<u32>,
    cumulative_logprob: f64,
    text: String,
    finish: Option<FinishReason>,
}

impl std::fmt::Debug for ActiveSequence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveSequence")
            .field("prompt_tokens", &self.prompt.len())
            .field("fed", &self.fed)
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
            cache: model.new_cache_with_limit(request.prompt.len() + max_tokens),
            sampler: Sampler::new(request.sampling)?,
            stream: tokenizer.decode_stream(request.skip_special_tokens),
            stops: StopStrings::new(&request.stop),
            prompt: request.prompt,
            fed: 0,
            reused: 0,
            input: Vec::new(),
            context,
            max_tokens,
            stop_token_ids: request.stop_token_ids,
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
            generated: Vec::new(),
            cumulative_logprob: 0.0,
            text: String::new(),
            finish,
        })
    }

    /// Tokens the next step feeds: the rest of the prompt, about `chunk` at a time (see
    /// [`prompt_step`]), then one.
    pub fn next_step_tokens(&self, chunk: usize) -> usize {
        if self.in_prefill() {
            prompt_step(self.prompt.len() - self.fed, chunk)
        } else {
            1
        }
    }

    /// Whether prompt tokens remain to be fed.
    pub fn in_prefill(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// This sequence's part of the next forward step: up to `chunk` prompt tokens while the
    /// prompt is being fed, then its last sampled token.
    pub fn step(&mut self, chunk: usize) -> SequenceStep<'_> {
        if self.in_prefill() {
            let take = self.next_step_tokens(chunk);
            self.input = self.prompt[self.fed..self.fed + take].to_vec();
        }
        let logits = if self.logprobs.is_none() && self.sampler.is_plain_greedy() {
            LogitsFor::Argmax
        } else {
            LogitsFor::Last
        };
        SequenceStep {
            tokens: &self.input,
            cache: &mut self.cache,
            logits,
        }
    }

    /// Starts the cache with the first `len` tokens `source` holds, which must be this
    /// prompt's first `len` tokens (see [`Self::shared_prefix`]): only the rest of the prompt
    /// is then computed. Before the first step only, and at least one prompt token is left
    /// to feed (its logits give the first sampled token).
    pub fn reuse_prefix(&mut self, source: &KvCache, len: usize) -> Result<()> {
        self.check_reuse(len)?;
        self.cache.copy_prefix_of(source, len)?;
        self.fed = len;
        self.reused = len;
        Ok(())
    }

    /// Like [`Self::reuse_prefix`], but takes `cache` over instead of copying it: its first
    /// `len` tokens stay, the rest is forgotten.
    pub fn adopt_cache(&mut self, mut cache: KvCache, len: usize) -> Result<()> {
        self.check_reuse(len)?;
        if len > cache.len() || !cache.uses_pool_of(&self.cache) {
            return Err(EngineError::InvalidInput(format!(
                "a cache of {} tokens (of this model's pool) cannot give {len}",
                cache.len()
            )));
        }
        cache.truncate(len);
        cache.shrink_to_fit();
        cache.set_limit(self.prompt.len() + self.max_tokens);
        self.cache = cache;
        self.fed = len;
        self.reused = len;
        Ok(())
    }

    fn check_reuse(&self, len: usize) -> Result<()> {
        if !self.cache.is_empty() || self.fed > 0 || len >= self.prompt.len() {
            return Err(EngineError::InvalidInput(format!(
                "a reused prefix of {len} tokens needs a sequence that has not started and a \
                 longer prompt ({} tokens, {} fed)",
                self.prompt.len(),
                self.fed
            )));
        }
        Ok(())
    }

    /// How many of `tokens`' first tokens this sequence's cache holds keys and values for:
    /// its prompt, then what it has generated, as far as they have been fed.
    pub fn shared_prefix(&self, tokens: &[u32]) -> usize {
        let held = self.cache.len();
        let in_prompt = held.min(self.prompt.len());
        let from_prompt = common_prefix(&self.prompt[..in_prompt], tokens);
        if from_prompt < in_prompt || held == in_prompt {
            return from_prompt;
        }
        let generated = &self.generated[..(held - in_prompt).min(self.generated.len())];
        from_prompt + common_prefix(generated, &tokens[from_prompt..])
    }

    /// Makes room in the cache for `tokens` more tokens. With `capped`, only within the key/value
    /// pool's row cap: false (nothing changed) when only growing the pool past it would make
    /// room; otherwise the pool grows as needed.
    pub fn reserve_cache(&mut self, tokens: usize, capped: bool) -> Result<bool> {
        if capped {
            self.cache.try_reserve(tokens)
        } else {
            self.cache.reserve(tokens).map(|_| true)
        }
    }

    /// How many of `tokens`' first tokens this sequence's prompt starts with, fed or not.
    pub fn prompt_overlap(&self, tokens: &[u32]) -> usize {
        common_prefix(&self.prompt, tokens)
    }

    /// The cache, for another sequence to copy a prefix of.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Hands over the cache and the tokens it holds keys and values for (the prompt, then the
    /// generated tokens fed so far), leaving this sequence an empty one. What a prefix cache
    /// keeps of a finished sequence.
    pub fn take_cache(&mut self) -> (Vec<u32>, KvCache) {
        let held = self.cache.len();
        let mut tokens: Vec<u32> = self.prompt.iter().take(held).copied().collect();
        let rest = held - tokens.len();
        tokens.extend(self.generated.iter().take(rest));
        let empty = self.cache.emptied();
        let mut cache = std::mem::replace(&mut self.cache, empty);
        // The cache's length counts only tokens whose ids are known.
        cache.truncate(tokens.len());
        (tokens, cache)
    }

    /// Whether the sequence has finished and should leave the batch.
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Tokens in this sequence's cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// Prompt tokens plus the most it may generate: what it can ever hold in its cache.
    pub fn reserved_tokens(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }

    /// Sampled tokens so far.
    pub fn generated_tokens(&self) -> usize {
        self.generated.len()
    }

    /// Takes this step's logits (`[1, vocab]`, or the `[1, 1]` id the step asked for with
    /// [`LogitsFor::Argmax`]). While the prompt is still being fed, only
    /// records progress and returns `None`; afterwards samples a token, decides whether the
    /// sequence is done and returns the token with the text that became final.
    pub fn advance(&mut self, logits: &Tensor) -> Result<Option<TokenOutput>> {
        if self.in_prefill() {
            self.fed += self.input.len();
            if self.in_prefill() {
                return Ok(None);
            }
        }
        let (token, logprob, top) = if logits.dtype() == DType::U32 {
            // The device's argmax (LogitsFor::Argmax): greedy, nothing else wanted.
            let token = logits.flatten_all()?.to_vec1::<u32>()?.first().copied();
            let token = token.ok_or_else(|| EngineError::InvalidInput("no token id".into()))?;
            self.sampler.record(token);
            (token, 0.0, Vec::new())
        } else {
            let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            let token = self.sampler.sample(&logits)?;
            let (logprob, top) = match self.logprobs {
                Some(top) => log_probability(&logits, token, top),
                None => (0.0, Vec::new()),
            };
            (token, logprob, top)
        };
        self.cumulative_logprob += f64::from(logprob);
        self.generated.push(token);
        let mut emitted = String::new();
        let is_stop = (!self.ignore_eos && self.tokenizer.is_stop(token))
            || self.stop_token_ids.contains(&token);
        if is_stop {
            self.finish = Some(FinishReason::Stop);
        } else {
            let piece = self.stream.push(token)?;
            let check = self.stops.push(&piece);
            emitted = check.emit;
            if check.stopped {
                self.finish = Some(FinishReason::Stop);
            } else if self.generated.len() >= self.max_tokens
                || self.prompt.len() + self.generated.len() >= self.context
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
        Ok(Some(TokenOutput {
            token,
            text: emitted,
            logprob: self.logprobs.map(|_| TokenLogprob {
                token,
                logprob,
                top,
            }),
        }))
    }

    /// The finished completion (a sequence stopped early reports `length`).
    pub fn into_completion(self) -> Completion {
        self.completion()
    }

    /// The completion so far, as [`Self::into_completion`] would report it.
    pub fn completion(&self) -> Completion {
        Completion {
            text: self.text.clone(),
            completion_tokens: self.generated.len(),
            token_ids: self.generated.clone(),
            prompt_tokens: self.prompt.len(),
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            cached_tokens: self.reused,
            cumulative_logprob: self.cumulative_logprob,
        }
    }
}

/// Prompt tokens a step feeds when `remaining` are still to be fed and `budget` tokens of the
/// step's prompt budget are left: as many as fit, except that a step never feeds exactly one
/// token of a longer rest, nor leaves exactly one behind. A one-token step takes the decode
/// kernels, which round differently from the prompt kernels, so a prompt's keys and values
/// (and its answer) would depend on how the budget happened to be split between the prompts
/// of a step; with at least two tokens a step, any split gives the same bits. A step may
/// therefore take up to two tokens past the budget.
pub fn prompt_step(remaining: usize, budget: usize) -> usize {
    let take = remaining.min(budget.max(1));
    if take == remaining {
        take
    } else if remaining - take == 1 {
        remaining
    } else if take == 1 {
        if remaining == 3 { 3 } else { 2 }
    } else {
        take
    }
}

/// Length of the longest common prefix of `a` and `b`.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The log-probability of `token` under the model's distribution (`log_softmax(logits)`), and
/// the `top` most likely tokens with theirs, most likely first (ties by id).
pub fn log_probability(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    let own = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    if top == 0 {
        return (own, Vec::new());
    }
    let mut ranked: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = top.min(ranked.len());
    if k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, order);
    }
    ranked.truncate(k);
    ranked.sort_unstable_by(order);
    (own, ranked.into_iter().map(|(id, l)| (id, lp(l))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_steps_never_feed_or_leave_a_single_token_of_a_longer_prompt() {
        for remaining in 1..40 {
            for budget in 0..45 {
                let take = prompt_step(remaining, budget);
                assert!(
                    (1..=remaining).contains(&take),
                    "{remaining} {budget}: {take}"
                );
                assert!(take <= budget.max(1) + 2, "{remaining} {budget}: {take}");
                if take < remaining {
                    assert!(
                        take >= 2 && remaining - take >= 2,
                        "{remaining} {budget}: {take}"
                    );
                    // Asking again with what was granted gives the same (the scheduler does).
                    assert_eq!(prompt_step(remaining, take), take);
                }
                if remaining > 1 {
                    assert_ne!(take, 1, "{remaining} {budget}");
                }
            }
        }
        assert_eq!(prompt_step(513, 512), 513);
        assert_eq!(prompt_step(600, 512), 512);
        assert_eq!(prompt_step(600, 1), 2);
        assert_eq!(prompt_step(3, 1), 3);
        assert_eq!(prompt_step(1, 512), 1);
    }

    #[test]
    fn log_probabilities_normalise_and_rank() {
        let logits = [1.0_f32, 3.0, 2.0, 3.0];
        let (own, top) = log_probability(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((f64::from(own) - (2.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = logits
            .iter()
            .map(|&l| f64::from(log_probability(&logits, 0, 0).0 - 1.0 + l).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
}
