//! One choice of a chat completion on its way out: engine tokens in, API text out, with the
//! holds a client must never see past — text that may still become a flagged phrase, and text
//! that may still turn out to be a tool call. A token's logprob entry names the token, so it is
//! held with the token's text and released only once that text is.

use std::collections::VecDeque;

use crate::azure::response::{ChoiceLogprobs, TokenLogprobEntry, ToolCall, TopLogprob};
use crate::azure::tool_calls;
use crate::content_safety::ContentFilter;
use crate::generation::{Completion, TokenOutput};
use crate::tokenizer::LlamaTokenizer;

/// What to send for a choice after a token or at the end.
#[derive(Debug, Default, PartialEq)]
pub struct Emission {
    pub content: String,
    pub logprobs: Vec<TokenLogprobEntry>,
    /// Set when the choice ended: `stop`, `length`, `content_filter` or `tool_calls`.
    pub finish_reason: Option<&'static str>,
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// The per-choice state.
#[derive(Debug)]
pub struct ChoiceState<'a> {
    filter: Option<&'a ContentFilter>,
    tokenizer: &'a LlamaTokenizer,
    tools: bool,
    id_seed: String,
    text: String,
    sent: usize,
    /// Logprob entries not yet released, each with the end of its token's text in `text`.
    held_logprobs: VecDeque<(usize, TokenLogprobEntry)>,
    flagged: bool,
    pub completion_tokens: usize,
}

impl<'a> ChoiceState<'a> {
    pub fn new(
        filter: Option<&'a ContentFilter>,
        tokenizer: &'a LlamaTokenizer,
        tools: bool,
        id_seed: String,
    ) -> Self {
        Self {
            filter,
            tokenizer,
            tools,
            id_seed,
            text: String::new(),
            sent: 0,
            held_logprobs: VecDeque::new(),
            flagged: false,
            completion_tokens: 0,
        }
    }

    /// Whether content safety ended this choice (the caller stops generating it).
    pub fn is_flagged(&self) -> bool {
        self.flagged
    }

    /// Everything generated so far, sent or held back (a tool call's JSON included).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes one generated token.
    pub fn push(&mut self, output: &TokenOutput) -> Emission {
        self.completion_tokens += 1;
        let mut emission = Emission::default();
        if self.flagged {
            return emission;
        }
        self.text.push_str(&output.text);
        if let Some(lp) = &output.logprob {
            let entry = TokenLogprobEntry {
                token: self.token_text(lp.token),
                logprob: lp.logprob,
                bytes: self.token_text(lp.token).into_bytes(),
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(id, logprob)| TopLogprob {
                        token: self.token_text(id),
                        logprob,
                        bytes: self.token_text(id).into_bytes(),
                    })
                    .collect(),
            };
            self.held_logprobs.push_back((self.text.len(), entry));
        }
        if let Some(flag) = self.filter.and_then(|f| f.check(&self.text)) {
            self.flagged = true;
            let end = floor_boundary(&self.text, flag.at.max(self.sent));
            emission.content = self.text[self.sent..end].to_owned();
            self.sent = end;
            emission.logprobs = self.release_logprobs();
            // The flagged token and any after it are never shown, not even as logprobs.
            self.held_logprobs.clear();
            emission.finish_reason = Some("content_filter");
            return emission;
        }
        if self.tools && tool_calls::may_become_call(&self.text) {
            return emission;
        }
        let hold = self.filter.map_or(0, ContentFilter::hold_back);
        let end = floor_boundary(&self.text, self.text.len().saturating_sub(hold));
        if end > self.sent {
            emission.content = self.text[self.sent..end].to_owned();
            self.sent = end;
        }
        emission.logprobs = self.release_logprobs();
        emission
    }

    /// The held entries whose token's text has been sent.
    fn release_logprobs(&mut self) -> Vec<TokenLogprobEntry> {
        let mut released = Vec::new();
        while let Some((end, _)) = self.held_logprobs.front() {
            if *end > self.sent {
                break;
            }
            if let Some((_, entry)) = self.held_logprobs.pop_front() {
                released.push(entry);
            }
        }
        released
    }

    /// Ends the choice with the engine's completion.
    pub fn finish(&mut self, completion: &Completion) -> Emission {
        if self.flagged {
            return Emission {
                finish_reason: Some("content_filter"),
                ..Emission::default()
            };
        }
        let logprobs = self.held_logprobs.drain(..).map(|(_, e)| e).collect();
        if self.tools
            && let Some(calls) = tool_calls::parse(&self.text, &self.id_seed)
        {
            return Emission {
                finish_reason: Some("tool_calls"),
                tool_calls: Some(calls),
                logprobs,
                ..Emission::default()
            };
        }
        let content = self.text[self.sent..].to_owned();
        self.sent = self.text.len();
        Emission {
            content,
            logprobs,
            finish_reason: Some(completion.finish_reason.as_str()),
            ..Emission::default()
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Collects a choice's logprob entries for a non-streamed answer.
pub fn logprobs_of(entries: Vec<TokenLogprobEntry>, wanted: bool) -> Option<ChoiceLogprobs> {
    wanted.then_some(ChoiceLogprobs { content: entries })
}
