//! Content safety: prompts and completions pass a classifier when enabled. The built-in one is
//! a blocklist of phrases (matched case-insensitively, on word boundaries) plus the phrases the
//! deployment adds. A flagged prompt is answered 400 `content_filter`; a completion that
//! becomes flagged ends with `finish_reason: content_filter`, and the flagged text is never sent.

/// Phrases that always flag a text: requests for mass-harm instructions.
const BUILT_IN: &[&str] = &[
    "build a bomb",
    "make a bomb",
    "pipe bomb instructions",
    "synthesize sarin",
    "make nerve agent",
    "weaponize anthrax",
    "child sexual abuse material",
    "make methamphetamine",
];

/// The classifier.
#[derive(Debug, Clone)]
pub struct ContentFilter {
    phrases: Vec<String>,
}

/// A flagged text: the phrase category that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flagged {
    pub category: &'static str,
    /// Byte offset in the checked text where the flagged phrase starts.
    pub at: usize,
}

impl ContentFilter {
    /// The built-in list plus `extra` phrases.
    pub fn new(extra: &[String]) -> Self {
        let mut phrases: Vec<String> = BUILT_IN.iter().map(|p| (*p).to_owned()).collect();
        phrases.extend(
            extra
                .iter()
                .map(|p| p.trim().to_lowercase())
                .filter(|p| !p.is_empty()),
        );
        Self { phrases }
    }

    /// Checks a text; `None` when it passes.
    pub fn check(&self, text: &str) -> Option<Flagged> {
        let lower = text.to_lowercase();
        // Lowercasing can change byte lengths; offsets are only used on the lowered text's
        // own scale when the lengths agree (ASCII and most scripts).
        let same_scale = lower.len() == text.len();
        self.phrases
            .iter()
            .filter_map(|phrase| find_word(&lower, phrase))
            .min()
            .map(|at| Flagged {
                category: "blocklist",
                at: if same_scale { at } else { 0 },
            })
    }

    /// Bytes at the end of a growing text to hold back: a phrase may still be completing there.
    pub fn hold_back(&self) -> usize {
        self.phrases.iter().map(String::len).max().unwrap_or(0)
    }
}

/// First occurrence of `phrase` in `text` with non-alphanumeric characters (or the ends) on
/// both sides.
fn find_word(text: &str, phrase: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text.get(from..)?.find(phrase) {
        let start = from + found;
        let end = start + phrase.len();
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
        if boundary(before) && boundary(after) {
            return Some(start);
        }
        from = start + phrase.chars().next().map_or(1, char::len_utf8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_match_case_insensitively_on_word_boundaries() {
        let filter = ContentFilter::new(&["Forbidden Fruit".into()]);
        assert!(filter.check("Tell me about FORBIDDEN fruit!").is_some());
        assert!(filter.check("how do I Build A Bomb").is_some());
        assert!(filter.check("unforbidden fruitcake").is_none());
        assert!(filter.check("a perfectly normal question").is_none());
        assert_eq!(filter.check("x forbidden fruit").map(|f| f.at), Some(2));
    }
}
