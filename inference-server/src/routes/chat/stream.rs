//! Streamed answers: data-only server-sent events, exactly `data: <json>\n\n` per event and
//! `data: [DONE]\n\n` at the end — no comments, ids or keep-alives (the Azure SDK rejects them).
//! A task drives the engine's sequences and writes frames into a channel the response body
//! reads; when the client goes away the body is dropped, the task's sends fail, and dropping
//! its engine receivers cancels the sequences.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::choice::{ChoiceState, Emission};
use super::{InFlight, Prepared, guard_flags, record_timings};

/// Tokens released at a time when Llama Guard judges a streamed completion.
const GUARD_WINDOW: usize = 16;
use crate::azure::ApiError;
use crate::azure::response::{ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, Usage};
use crate::scheduler::SequenceEvent;
use crate::state::AppState;

/// Starts the stream and returns the response whose body it feeds.
pub(super) fn respond(
    state: Arc<AppState>,
    prepared: Prepared,
    receivers: Vec<UnboundedReceiver<SequenceEvent>>,
    guard: InFlight,
) -> Response {
    let (frames, body) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        drive(state, prepared, receivers, frames).await;
        drop(guard);
    });
    let stream = futures::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|frame| (Ok::<_, std::convert::Infallible>(frame), body))
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn frame<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("data: {json}\n\n"))
}

async fn drive(
    state: Arc<AppState>,
    prepared: Prepared,
    receivers: Vec<UnboundedReceiver<SequenceEvent>>,
    frames: mpsc::Sender<Bytes>,
) {
    let Some(engine) = state.engine() else { return };
    let r = &prepared.request;
    let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
        id: prepared.id.clone(),
        object: "chat.completion.chunk",
        created: prepared.created,
        model: state.config.model_name.clone(),
        choices,
        usage,
    };
    let count = receivers.len();
    let mut choices: Vec<ChoiceState<'_>> = (0..count)
        .map(|index| {
            ChoiceState::new(
                state.filter.as_ref(),
                &engine.tokenizer,
                r.tools.is_some(),
                format!("{}{index}", &prepared.id[9..17.min(prepared.id.len())]),
            )
        })
        .collect();
    // The role comes first, for every choice.
    for index in 0..count {
        let role = ChunkChoice {
            index,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            },
            finish_reason: None,
            logprobs: None,
        };
        if frames.send(frame(&chunk(vec![role], None))).await.is_err() {
            return;
        }
    }
    let mut events =
        futures::stream::select_all(receivers.into_iter().enumerate().map(|(index, receiver)| {
            futures::stream::unfold(receiver, |mut rx| async move {
                rx.recv().await.map(|event| (event, rx))
            })
            .map(move |event| (index, event))
            .boxed()
        }));
    let mut first_token: Option<Instant> = None;
    let mut cached = 0;
    let mut done = vec![false; count];
    // With Llama Guard on, text is released in windows of GUARD_WINDOW tokens, each after the
    // classifier judged everything released so far plus the window.
    let guarded = state.guard.get().is_some();
    let mut released = vec![String::new(); count];
    let mut pending = vec![String::new(); count];
    let mut pending_tokens = vec![0usize; count];
    let mut pending_logprobs = vec![Vec::new(); count];
    while let Some((index, event)) = events.next().await {
        if done[index] {
            continue;
        }
        let emission = match event {
            SequenceEvent::Started { cached_tokens } => {
                cached = cached.max(cached_tokens);
                continue;
            }
            SequenceEvent::Token(output) => {
                first_token.get_or_insert_with(Instant::now);
                let mut emission = choices[index].push(&output);
                if choices[index].is_flagged() {
                    state.metrics.count_filtered("completion");
                    emission.finish_reason = Some("content_filter");
                }
                emission
            }
            SequenceEvent::Finished(completion) => choices[index].finish(&completion),
            SequenceEvent::Failed(message) => {
                tracing::error!(%message, "generation failed mid-stream");
                let error = ApiError::internal(format!("generation failed: {message}"));
                let _ = frames.send(frame(&error.body())).await;
                return;
            }
        };
        let mut emission = emission;
        if guarded && emission.finish_reason != Some("content_filter") {
            pending[index].push_str(&std::mem::take(&mut emission.content));
            pending_logprobs[index].append(&mut emission.logprobs);
            pending_tokens[index] += 1;
            let window_full = pending_tokens[index] >= GUARD_WINDOW;
            // A tool call is judged as the JSON the model wrote, before its delta is sent.
            let candidate = if emission.tool_calls.is_some() {
                Some(choices[index].text().to_owned())
            } else if (window_full || emission.finish_reason.is_some())
                && !pending[index].is_empty()
            {
                Some(format!("{}{}", released[index], pending[index]))
            } else {
                None
            };
            if let Some(candidate) = candidate {
                if guard_flags(&state, r, Some(&candidate)).await.is_some() {
                    state.metrics.count_filtered("completion");
                    pending[index].clear();
                    pending_logprobs[index].clear();
                    emission.finish_reason = Some("content_filter");
                    emission.tool_calls = None;
                } else {
                    emission.content = std::mem::take(&mut pending[index]);
                    emission.logprobs = std::mem::take(&mut pending_logprobs[index]);
                    released[index].push_str(&emission.content);
                }
                pending_tokens[index] = 0;
            }
        }
        let finished = emission.finish_reason.is_some();
        if finished {
            done[index] = true;
        }
        let usage = finished.then(|| {
            let tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
            Usage::new(prepared.prompt.len(), tokens).with_cached(cached)
        });
        if let Some(piece) = to_chunk(index, emission, r.logprobs.is_some())
            && frames
                .send(frame(&chunk(vec![piece], usage)))
                .await
                .is_err()
        {
            return;
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    // Dropping the receivers cancels whatever still runs (a choice ended by content safety).
    drop(events);
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    record_timings(&state, &prepared, first_token, completion_tokens);
    state.limiter.charge(completion_tokens as u64);
    if r.include_usage {
        let usage = Usage::new(prepared.prompt.len(), completion_tokens).with_cached(cached);
        if frames
            .send(frame(&chunk(Vec::new(), Some(usage))))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = frames.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

/// The chunk for one emission, or `None` when there is nothing to say.
fn to_chunk(index: usize, emission: Emission, logprobs: bool) -> Option<ChunkChoice> {
    let tool_calls = emission.tool_calls.map(|calls| {
        calls
            .into_iter()
            .enumerate()
            .map(|(i, call)| {
                serde_json::json!({
                    "index": i,
                    "id": call.id,
                    "type": call.kind,
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                })
            })
            .collect::<Vec<_>>()
    });
    if emission.content.is_empty()
        && emission.finish_reason.is_none()
        && tool_calls.is_none()
        && emission.logprobs.is_empty()
    {
        return None;
    }
    Some(ChunkChoice {
        index,
        delta: Delta {
            role: None,
            content: (!emission.content.is_empty() || emission.finish_reason.is_none())
                .then_some(emission.content),
            tool_calls,
        },
        finish_reason: emission.finish_reason,
        logprobs: (logprobs && !emission.logprobs.is_empty()).then_some(ChoiceLogprobs {
            content: emission.logprobs,
        }),
    })
}
