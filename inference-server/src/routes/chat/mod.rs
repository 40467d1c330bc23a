//! `POST /chat/completions` (and its `/models/` and `/v1/` aliases): authenticate, read and
//! validate the body, render the prompt, check content safety and rate limits, submit to the
//! engine, answer in one JSON body or as a server-sent event stream.

mod choice;
mod stream;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::azure::ApiError;
use crate::azure::request::{ChatRequest, Dialect, ExtraParameters};
use crate::azure::response::{ChatCompletion, Choice, ResponseMessage, Usage};
use crate::generation::{Completion, GenerationRequest};
use crate::llama_guard::{Judged, Verdict};
use crate::rate_limit::Remaining;
use crate::sampling::SamplingParams;
use crate::scheduler::{SequenceEvent, SubmitError};
use crate::state::{AppState, Engine, unix_now};
use choice::{ChoiceState, logprobs_of};

/// Azure routes.
pub async fn azure(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Dialect::Azure).await
}

/// OpenAI-compatible routes.
pub async fn openai(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Dialect::OpenAi).await
}

/// A request in flight, counted in the gauge until dropped.
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

/// Everything decided before generation starts.
pub(crate) struct Prepared {
    pub request: ChatRequest,
    pub prompt: Vec<u32>,
    pub id: String,
    pub created: u64,
    pub remaining: Remaining,
    pub arrived: Instant,
}

async fn handle(state: Arc<AppState>, request: Request, dialect: Dialect) -> Response {
    let arrived = Instant::now();
    state.metrics.in_flight.inc();
    let guard = InFlight(Arc::clone(&state));
    let (parts, body) = request.into_parts();
    let prepared = match prepare(&state, &parts.headers, body, dialect, arrived).await {
        Ok(prepared) => prepared,
        Err(error) => {
            let limited = error.status == StatusCode::TOO_MANY_REQUESTS;
            let mut response = error.into_response();
            if limited {
                rate_headers(
                    response.headers_mut(),
                    state.limiter.remaining(Instant::now()),
                );
            }
            return response;
        }
    };
    let Some(engine) = state.engine() else {
        return ApiError::unavailable("The model is loading.", 5).into_response();
    };
    let receivers = match submit(engine, &prepared) {
        Ok(receivers) => receivers,
        Err(error) => {
            if error.status == StatusCode::TOO_MANY_REQUESTS {
                state.metrics.count_rate_limited("queue");
            }
            return error.into_response();
        }
    };
    state
        .metrics
        .prompt_tokens
        .inc_by(prepared.prompt.len() as u64);
    let remaining = prepared.remaining;
    let mut response = if prepared.request.stream {
        stream::respond(Arc::clone(&state), prepared, receivers, guard)
    } else {
        let result = collect(&state, engine, &prepared, receivers).await;
        drop(guard);
        match result {
            Ok(body) => (StatusCode::OK, axum::Json(body)).into_response(),
            Err(error) => error.into_response(),
        }
    };
    rate_headers(response.headers_mut(), remaining);
    response
}

/// Steps before generation; each failure is an API error.
async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    dialect: Dialect,
    arrived: Instant,
) -> Result<Prepared, ApiError> {
    state.auth.check(headers)?;
    if state.is_draining() {
        return Err(ApiError::unavailable(
            "The server is shutting down; retry on another instance.",
            2,
        ));
    }
    let Some(engine) = state.engine() else {
        return Err(ApiError::unavailable("The model is loading.", 5));
    };
    let limit = state.config.http.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::malformed_json(format!(
            "The request body is not valid JSON: {} (line {}, column {}).",
            err,
            err.line(),
            err.column()
        ))
    })?;
    let extra = ExtraParameters::from_header(
        headers
            .get("extra-parameters")
            .and_then(|v| v.to_str().ok()),
    )?;
    let request = ChatRequest::parse(json, extra, dialect)?;
    if let Some(filter) = &state.filter {
        let prompt_text: String = request
            .messages
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect::<Vec<_>>()
            .join("\n");
        if let Some(flag) = filter.check(&prompt_text) {
            state.metrics.count_filtered("prompt");
            return Err(ApiError::content_filter(flag.category));
        }
    }
    if let Some(description) = guard_flags(state, &request, None).await {
        state.metrics.count_filtered("prompt");
        return Err(ApiError::content_filter(&description));
    }
    let text = engine
        .template
        .render_json(
            &Value::Array(request.messages.clone()),
            request.tools.as_ref(),
            true,
        )
        .map_err(|err| ApiError::invalid("messages", format!("cannot build the prompt: {err}")))?;
    let prompt = engine
        .tokenizer
        .encode(&text, false)
        .map_err(|err| ApiError::internal(err.to_string()))?;
    let limit = engine.handle.max_prompt_tokens();
    if prompt.len() > limit {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "The prompt has {} tokens; this deployment accepts at most {limit}. Shorten the \
                 messages.",
                prompt.len()
            ),
        ));
    }
    let remaining = state
        .limiter
        .admit(prompt.len() as u64, Instant::now())
        .map_err(|refusal| {
            state.metrics.count_rate_limited(refusal.limit.label());
            ApiError::rate_limited(
                format!(
                    "Rate limit of {} per minute exceeded for this deployment; retry after {} \
                     seconds.",
                    refusal.limit.label(),
                    refusal.retry_after
                ),
                refusal.retry_after,
            )
        })?;
    Ok(Prepared {
        request,
        prompt,
        id: format!("chatcmpl-{}", random_hex()),
        created: unix_now(),
        remaining,
        arrived,
    })
}

/// Queues one engine sequence per choice (or per `best_of` candidate).
fn submit(
    engine: &Engine,
    prepared: &Prepared,
) -> Result<Vec<UnboundedReceiver<SequenceEvent>>, ApiError> {
    let r = &prepared.request;
    if r.use_beam_search {
        let mut request = GenerationRequest::new(
            prepared.prompt.clone(),
            r.max_tokens,
            SamplingParams::greedy(),
        );
        request.stop = r.stop.clone();
        request.stop_token_ids = r.stop_token_ids.clone();
        request.ignore_eos = r.ignore_eos;
        request.skip_special_tokens = r.skip_special_tokens;
        let width = r.best_of.unwrap_or(2);
        return engine
            .handle
            .submit_beam(request, width, r.n)
            .map(|receiver| vec![receiver])
            .map_err(submit_error);
    }
    let count = r.best_of.unwrap_or(r.n).max(r.n);
    let wants_logprobs = r.logprobs.is_some() || count > r.n;
    let mut receivers = Vec::with_capacity(count);
    for i in 0..count {
        let sampling = SamplingParams {
            // top_p 0 keeps only the most likely token: greedy.
            temperature: if r.top_p == 0.0 { 0.0 } else { r.temperature },
            top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
            seed: r.seed.map(|s| s.wrapping_add(i as u64)),
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
        };
        let request = GenerationRequest {
            prompt: prepared.prompt.clone(),
            max_tokens: r.max_tokens,
            stop: r.stop.clone(),
            sampling,
            stop_token_ids: r.stop_token_ids.clone(),
            ignore_eos: r.ignore_eos,
            skip_special_tokens: r.skip_special_tokens,
            logprobs: if wants_logprobs {
                Some(r.logprobs.unwrap_or(0))
            } else {
                None
            },
        };
        receivers.push(engine.handle.submit(request).map_err(submit_error)?);
    }
    Ok(receivers)
}

fn submit_error(error: SubmitError) -> ApiError {
    match error {
        SubmitError::Overloaded { .. } => ApiError::rate_limited(
            "The server is at capacity (its request queue is full); retry shortly.",
            1,
        ),
        SubmitError::Stopped => ApiError::unavailable("The engine has stopped.", 5),
        other => ApiError::invalid("messages", other.to_string()),
    }
}

/// Waits for every sequence and builds the JSON answer.
async fn collect(
    state: &AppState,
    engine: &Engine,
    prepared: &Prepared,
    receivers: Vec<UnboundedReceiver<SequenceEvent>>,
) -> Result<ChatCompletion, ApiError> {
    let r = &prepared.request;
    if r.use_beam_search {
        return collect_beams(state, prepared, receivers).await;
    }
    let mut finished = Vec::with_capacity(receivers.len());
    let mut first_token: Option<Instant> = None;
    let mut cached = 0;
    for (index, mut receiver) in receivers.into_iter().enumerate() {
        let mut choice = ChoiceState::new(
            state.filter.as_ref(),
            &engine.tokenizer,
            r.tools.is_some(),
            format!("{}{index}", &prepared.id[9..17.min(prepared.id.len())]),
        );
        let mut content = String::new();
        let mut logprobs = Vec::new();
        let mut outcome = None;
        while let Some(event) = receiver.recv().await {
            match event {
                SequenceEvent::Started { cached_tokens } => cached = cached.max(cached_tokens),
                SequenceEvent::Token(output) => {
                    first_token.get_or_insert_with(Instant::now);
                    let emission = choice.push(&output);
                    content.push_str(&emission.content);
                    logprobs.extend(emission.logprobs);
                    if choice.is_flagged() {
                        state.metrics.count_filtered("completion");
                        outcome = Some((choice.finish(&flagged_completion(prepared)), None));
                        break;
                    }
                }
                SequenceEvent::Finished(completion) => {
                    let mut emission = choice.finish(&completion);
                    content.push_str(&emission.content);
                    logprobs.append(&mut emission.logprobs);
                    outcome = Some((emission, Some(completion)));
                    break;
                }
                SequenceEvent::Failed(message) => {
                    tracing::error!(%message, "generation failed");
                    return Err(ApiError::internal(format!("generation failed: {message}")));
                }
            }
        }
        let Some((emission, completion)) = outcome else {
            return Err(ApiError::unavailable("The engine stopped mid-request.", 2));
        };
        let (mut emission, mut content) = (emission, content);
        // Llama Guard judges the whole answer; a tool call is judged as the JSON the model
        // wrote (its arguments can carry what a text answer would).
        let judged = if emission.tool_calls.is_some() {
            choice.text()
        } else {
            content.as_str()
        };
        if emission.finish_reason != Some("content_filter")
            && guard_flags(state, r, Some(judged)).await.is_some()
        {
            state.metrics.count_filtered("completion");
            content.clear();
            logprobs.clear();
            emission.finish_reason = Some("content_filter");
            emission.tool_calls = None;
        }
        let tokens = choice.completion_tokens;
        let score = completion.as_ref().map_or(f64::NEG_INFINITY, |c| {
            c.cumulative_logprob / (c.completion_tokens.max(1) as f64)
        });
        finished.push((emission, content, logprobs, tokens, score));
    }
    let completion_tokens: usize = finished.iter().map(|f| f.3).sum();
    record_timings(state, prepared, first_token, completion_tokens);
    state.limiter.charge(completion_tokens as u64);
    // best_of: keep the n candidates with the highest mean token log-probability.
    if finished.len() > r.n {
        finished.sort_by(|a, b| b.4.total_cmp(&a.4));
        finished.truncate(r.n);
    }
    let choices = finished
        .into_iter()
        .enumerate()
        .map(|(index, (emission, content, logprobs, _, _))| {
            let tool_calls = emission.tool_calls;
            Choice {
                index,
                message: ResponseMessage {
                    role: "assistant",
                    content: if tool_calls.is_some() {
                        None
                    } else {
                        Some(content)
                    },
                    tool_calls,
                },
                finish_reason: emission.finish_reason.unwrap_or("stop"),
                logprobs: logprobs_of(logprobs, r.logprobs.is_some()),
            }
        })
        .collect();
    Ok(ChatCompletion {
        id: prepared.id.clone(),
        object: "chat.completion",
        created: prepared.created,
        model: state.config.model_name.clone(),
        choices,
        usage: Usage::new(prepared.prompt.len(), completion_tokens).with_cached(cached),
    })
}

/// The `n` best beams, each a choice.
async fn collect_beams(
    state: &AppState,
    prepared: &Prepared,
    receivers: Vec<UnboundedReceiver<SequenceEvent>>,
) -> Result<ChatCompletion, ApiError> {
    let mut completions = Vec::new();
    for mut receiver in receivers {
        while let Some(event) = receiver.recv().await {
            match event {
                SequenceEvent::Finished(completion) => completions.push(completion),
                SequenceEvent::Failed(message) => {
                    return Err(ApiError::internal(format!("generation failed: {message}")));
                }
                SequenceEvent::Started { .. } | SequenceEvent::Token(_) => {}
            }
        }
    }
    let completion_tokens: usize = completions.iter().map(|c| c.completion_tokens).sum();
    record_timings(state, prepared, None, completion_tokens);
    state.limiter.charge(completion_tokens as u64);
    // Every beam passes the same classifiers as a sampled answer: the blocklist (cut before
    // the flagged phrase), then Llama Guard on the whole text (nothing of it is returned).
    let mut choices = Vec::with_capacity(completions.len());
    for (index, completion) in completions.into_iter().enumerate() {
        let flagged = state
            .filter
            .as_ref()
            .and_then(|f| f.check(&completion.text));
        let (content, finish) = match flagged {
            Some(flag) => {
                state.metrics.count_filtered("completion");
                (
                    completion
                        .text
                        .get(..flag.at)
                        .unwrap_or_default()
                        .to_owned(),
                    "content_filter",
                )
            }
            None => {
                if guard_flags(state, &prepared.request, Some(&completion.text))
                    .await
                    .is_some()
                {
                    state.metrics.count_filtered("completion");
                    (String::new(), "content_filter")
                } else {
                    (completion.text, completion.finish_reason.as_str())
                }
            }
        };
        choices.push(Choice {
            index,
            message: ResponseMessage {
                role: "assistant",
                content: Some(content),
                tool_calls: None,
            },
            finish_reason: finish,
            logprobs: None,
        });
    }
    Ok(ChatCompletion {
        id: prepared.id.clone(),
        object: "chat.completion",
        created: prepared.created,
        model: state.config.model_name.clone(),
        choices,
        usage: Usage::new(prepared.prompt.len(), completion_tokens),
    })
}

/// Asks Llama Guard (when configured) about the conversation's last user turn, or about
/// `answer` as the assistant's reply. `Some(categories)` when the text is flagged.
pub(crate) async fn guard_flags(
    state: &AppState,
    request: &ChatRequest,
    answer: Option<&str>,
) -> Option<String> {
    let guard = state.guard.get()?;
    let mut turns: Vec<(&str, &str)> = request
        .messages
        .iter()
        .filter_map(|m| {
            let role = m["role"].as_str()?;
            matches!(role, "user" | "assistant").then_some((role, m["content"].as_str()?))
        })
        .collect();
    let judged = match answer {
        Some(answer) => {
            turns.push(("assistant", answer));
            Judged::Agent
        }
        None => Judged::User,
    };
    match guard.classify(&turns, judged).await {
        Ok(Verdict::Safe) => None,
        Ok(verdict) => Some(verdict.describe()),
        Err(error) => {
            state.metrics.content_safety_errors.inc();
            tracing::warn!(%error, "Llama Guard gave no verdict");
            let fail_closed = state
                .config
                .content_safety
                .llama_guard
                .as_ref()
                .is_some_and(|g| g.fail_closed);
            fail_closed.then(|| "the classifier could not judge the text".to_owned())
        }
    }
}

/// A placeholder completion for a choice content safety ended.
pub(crate) fn flagged_completion(prepared: &Prepared) -> Completion {
    Completion {
        text: String::new(),
        token_ids: Vec::new(),
        prompt_tokens: prepared.prompt.len(),
        completion_tokens: 0,
        finish_reason: crate::generation::FinishReason::Stop,
        cached_tokens: 0,
        cumulative_logprob: 0.0,
    }
}

/// Time to first token, time per output token, end-to-end latency, token counters.
pub(crate) fn record_timings(
    state: &AppState,
    prepared: &Prepared,
    first_token: Option<Instant>,
    completion_tokens: usize,
) {
    let metrics = &state.metrics;
    metrics.completion_tokens.inc_by(completion_tokens as u64);
    let now = Instant::now();
    metrics
        .request_seconds
        .observe(now.duration_since(prepared.arrived).as_secs_f64());
    if let Some(first) = first_token {
        metrics
            .time_to_first_token
            .observe(first.duration_since(prepared.arrived).as_secs_f64());
        if completion_tokens > 1 {
            metrics
                .time_per_output_token
                .observe(now.duration_since(first).as_secs_f64() / (completion_tokens - 1) as f64);
        }
    }
}

/// `x-ratelimit-remaining-requests` and `-tokens`.
pub(crate) fn rate_headers(headers: &mut HeaderMap, remaining: Remaining) {
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(remaining.requests),
    );
    headers.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(remaining.tokens),
    );
}

/// 24 random hex digits for response ids.
fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(24);
    for _ in 0..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff));
    }
    out
}
