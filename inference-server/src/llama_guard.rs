//! Llama Guard 3 as the content-safety classifier: a second model, loaded by the same engine,
//! asked in its own prompt format whether the last user (prompt check) or agent (completion
//! check) turn of a conversation is safe under the hazard categories S1–S13. Its answer is
//! `safe`, or `unsafe` with a line of violated categories.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::engine::LlamaModel;
use crate::generation::GenerationRequest;
use crate::metrics::EngineGauges;
use crate::sampling::SamplingParams;
use crate::scheduler::{EngineHandle, SchedulerLimits, SequenceEvent};
use crate::tokenizer::LlamaTokenizer;

/// The hazard categories of Llama Guard 3 that this server enforces.
pub const CATEGORIES: [(&str, &str); 13] = [
    ("S1", "Violent Crimes"),
    ("S2", "Non-Violent Crimes"),
    ("S3", "Sex Crimes"),
    ("S4", "Child Sexual Exploitation"),
    ("S5", "Defamation"),
    ("S6", "Specialized Advice"),
    ("S7", "Privacy"),
    ("S8", "Intellectual Property"),
    ("S9", "Indiscriminate Weapons"),
    ("S10", "Hate"),
    ("S11", "Suicide & Self-Harm"),
    ("S12", "Sexual Content"),
    ("S13", "Elections"),
];

/// Whose turn is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// The last user message (the prompt check).
    User,
    /// The assistant's answer (the completion check).
    Agent,
}

/// The classifier's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Safe,
    /// Violated category codes (`S1`…), possibly empty when the model named none.
    Unsafe(Vec<String>),
}

impl Verdict {
    /// A human description of the violated categories, for the error message.
    pub fn describe(&self) -> String {
        match self {
            Self::Safe => "safe".into(),
            Self::Unsafe(codes) if codes.is_empty() => "unsafe content".into(),
            Self::Unsafe(codes) => codes
                .iter()
                .map(|code| {
                    CATEGORIES
                        .iter()
                        .find(|(c, _)| c == code)
                        .map_or_else(|| code.clone(), |(c, name)| format!("{c}: {name}"))
                })
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// A classifier standing in for the guard model: the conversation's `(role, text)` turns and
/// the judged role in, a verdict (or no verdict) out.
pub type ClassifyFn = dyn Fn(&[(&str, &str)], Judged) -> Result<Verdict, String> + Send + Sync;

/// The content-safety classifier: a loaded Llama Guard model, or a function in its place.
pub struct LlamaGuard {
    backend: Backend,
}

enum Backend {
    Model {
        handle: EngineHandle,
        tokenizer: Arc<LlamaTokenizer>,
    },
    Function(Box<ClassifyFn>),
}

impl std::fmt::Debug for LlamaGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Model { handle, .. } => f
                .debug_struct("LlamaGuard")
                .field("handle", handle)
                .finish_non_exhaustive(),
            Backend::Function(_) => f.write_str("LlamaGuard(function)"),
        }
    }
}

impl LlamaGuard {
    /// Loads a Llama Guard model directory (Hugging Face layout) onto its own engine thread.
    pub fn load(dir: &Path, gauges: EngineGauges) -> Result<Self, String> {
        let tokenizer = Arc::new(
            LlamaTokenizer::from_dir(dir).map_err(|e| format!("Llama Guard tokenizer: {e}"))?,
        );
        let model = LlamaModel::load(dir, DType::F32, &Device::Cpu)
            .map_err(|e| format!("Llama Guard model: {e}"))?;
        let context = model.context_length().min(8192);
        let limits = SchedulerLimits {
            context_tokens: context,
            max_batch_size: 8,
            kv_cache_tokens: 8 * context,
            max_queue: 256,
            prefill_chunk_tokens: 512,
            // Every verdict's prompt starts with the same policy text.
            prefix_cache: true,
        };
        let handle = EngineHandle::start(model, Arc::clone(&tokenizer), limits, gauges)
            .map_err(|e| format!("cannot start the Llama Guard engine: {e}"))?;
        Ok(Self {
            backend: Backend::Model { handle, tokenizer },
        })
    }

    /// Whether the classifier can still answer: its engine thread runs (always, for a
    /// function).
    pub fn is_running(&self) -> bool {
        match &self.backend {
            Backend::Model { handle, .. } => handle.is_running(),
            Backend::Function(_) => true,
        }
    }

    /// A classifier that answers with `classify` instead of a model: for tests (a verdict
    /// that differs between the prompt and the completion check, which a programmed model
    /// cannot give) and for embedders with their own classifier. Set it into
    /// `AppState::guard` before the engine is loaded, with no `llamaGuard` configured.
    pub fn from_fn(
        classify: impl Fn(&[(&str, &str)], Judged) -> Result<Verdict, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            backend: Backend::Function(Box::new(classify)),
        }
    }

    /// Classifies the conversation (`(role, text)` pairs, roles `user` or `assistant`).
    pub async fn classify(
        &self,
        turns: &[(&str, &str)],
        judged: Judged,
    ) -> Result<Verdict, String> {
        let (handle, tokenizer) = match &self.backend {
            Backend::Model { handle, tokenizer } => (handle, tokenizer),
            Backend::Function(classify) => return classify(turns, judged),
        };
        let prompt = render(turns, judged);
        let ids = tokenizer
            .encode(&prompt, false)
            .map_err(|e| e.to_string())?;
        // Keep the tail when a conversation is longer than the guard's window: the judged turn
        // is at the end.
        let limit = handle.max_prompt_tokens().saturating_sub(16);
        let ids = if ids.len() > limit {
            ids[ids.len() - limit..].to_vec()
        } else {
            ids
        };
        let request = GenerationRequest::new(ids, Some(12), SamplingParams::greedy());
        let mut events = handle.submit(request).map_err(|e| e.to_string())?;
        while let Some(event) = events.recv().await {
            match event {
                SequenceEvent::Finished(completion) => return parse(&completion.text),
                SequenceEvent::Failed(message) => return Err(message),
                SequenceEvent::Started { .. } | SequenceEvent::Token(_) => {}
            }
        }
        Err("the Llama Guard engine stopped".into())
    }
}

/// Llama Guard 3's prompt: the task, the categories, the conversation, the instructions.
pub fn render(turns: &[(&str, &str)], judged: Judged) -> String {
    let role = match judged {
        Judged::User => "User",
        Judged::Agent => "Agent",
    };
    let mut text = String::from("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n");
    text.push_str(&format!(
        "Task: Check if there is unsafe content in '{role}' messages in conversations according \
         our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    ));
    for (code, name) in CATEGORIES {
        text.push_str(&format!("{code}: {name}.\n"));
    }
    text.push_str("<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n");
    for (speaker, content) in turns {
        let who = if *speaker == "assistant" {
            "Agent"
        } else {
            "User"
        };
        text.push_str(&format!("{who}: {}\n\n", content.trim()));
    }
    text.push_str(&format!(
        "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message \
         in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, \
         a second line must include a comma-separated list of violated categories.\
         <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ));
    text
}

/// Reads the guard's answer; anything but `safe`/`unsafe` on the first line is an error.
pub fn parse(answer: &str) -> Result<Verdict, String> {
    let mut lines = answer.trim().lines();
    match lines.next().map(str::trim) {
        Some("safe") => Ok(Verdict::Safe),
        Some("unsafe") => Ok(Verdict::Unsafe(
            lines
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
        )),
        _ => Err(format!(
            "unexpected classifier answer {:?}",
            answer.chars().take(40).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        assert_eq!(parse("safe"), Ok(Verdict::Safe));
        assert_eq!(
            parse("\nunsafe\nS1,S10"),
            Ok(Verdict::Unsafe(vec!["S1".into(), "S10".into()]))
        );
        assert!(parse("maybe").is_err());
        assert_eq!(
            Verdict::Unsafe(vec!["S9".into()]).describe(),
            "S9: Indiscriminate Weapons"
        );
    }

    #[test]
    fn prompt_names_the_judged_role_and_every_category() {
        let text = render(&[("user", "hi"), ("assistant", "hello")], Judged::Agent);
        assert!(text.contains("'Agent' messages"));
        assert!(text.contains("User: hi\n\nAgent: hello\n\n"));
        assert!(text.contains("S13: Elections."));
        assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }
}
