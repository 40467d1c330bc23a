//! Cutting a completion at the first stop string without ever emitting part of one.

/// Text that is safe to emit, and whether a stop string ended the completion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCheck {
    pub emit: String,
    pub stopped: bool,
}

/// Holds back the tail of the text that could still grow into a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    /// Empty stop strings are ignored (they would stop before any text).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds newly decoded text. Returns what can be emitted now; on a stop string, the text
    /// before it and `stopped = true` (the stop string itself is never emitted).
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min()
        {
            let emit = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        // Emit everything before the earliest suffix that is a prefix of some stop string.
        let keep_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let emit = self.pending[..keep_from].to_owned();
        self.pending.drain(..keep_from);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// The held-back text, when the completion ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut matcher = StopStrings::new(&stops);
        let mut emitted = Vec::new();
        for piece in pieces {
            let check = matcher.push(piece);
            emitted.push(check.emit);
            if check.stopped {
                return (emitted, true, String::new());
            }
        }
        (emitted, false, matcher.finish())
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let (emitted, stopped, _) = run(&["END"], &["abc E", "N", "D tail"]);
        assert!(stopped);
        assert_eq!(emitted, vec!["abc ", "", ""]);
    }

    #[test]
    fn false_start_is_released_once_it_cannot_match() {
        let (emitted, stopped, rest) = run(&["END"], &["xE", "Nx", "y"]);
        assert!(!stopped);
        assert_eq!(emitted.concat() + &rest, "xENxy");
        assert_eq!(emitted, vec!["x", "ENx", "y"]);
    }

    #[test]
    fn earliest_of_several_stops_wins_and_text_before_is_kept() {
        let (emitted, stopped, _) = run(&["world", "lo w"], &["hello world"]);
        assert!(stopped);
        assert_eq!(emitted, vec!["hel"]);
    }

    #[test]
    fn pending_prefix_is_flushed_at_the_end() {
        let (emitted, stopped, rest) = run(&["\n\n"], &["a\n"]);
        assert!(!stopped);
        assert_eq!((emitted.concat(), rest), ("a".to_owned(), "\n".to_owned()));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let (emitted, stopped, _) = run(&["éé"], &["aé", "bé", "é!"]);
        assert!(stopped);
        assert_eq!(emitted, vec!["a", "éb", ""]);
    }
}
