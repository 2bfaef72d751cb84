//! Stop strings on streamed text.
//!
//! A stop string may be split across tokens ("\n\n" as "\n" + "\n", "END" as "E" + "ND"), so
//! it is searched in the decoded text, not in token ids. While streaming, text that could be
//! the start of a stop string is held back until the next tokens show whether it is one: the
//! client never receives part of a stop string, and the text ends right before it.

/// Finds the first stop string in text pushed piece by piece.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released: a possible beginning of a stop string.
    held: String,
}

impl StopMatcher {
    /// `stops` must not contain the empty string (the request parser refuses it).
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Add decoded text. Returns the text that can be released now and whether a stop string
    /// was found (the released text then ends right before it, and nothing more may follow).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        // Held text never contains a whole stop string (it would have been found when it
        // completed), so a match must end in the new text; the earliest start wins.
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        (out, false)
    }

    /// The sequence ended: whatever was held back was not a stop string after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with (0 if none). The
/// prefixes tried end on character boundaries, so the split in `text` does too.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Push `pieces` one by one; the released text and whether a stop was hit.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out.push_str(&t);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_released_when_it_turns_out_not_to_be_a_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abE"), ("ab".into(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("x"), ("ENx".into(), false));
        assert_eq!(run(&["END"], &["aEN"]), ("aEN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&["xyz", "yq"], &["axy", "q"]), ("ax".into(), true));
    }

    #[test]
    fn no_stops_releases_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_prefixes_split_on_char_boundaries() {
        // "é" is two bytes: the held suffix must never cut it.
        assert_eq!(run(&["éz"], &["aé", "b"]), ("aéb".into(), false));
        assert_eq!(run(&["éz"], &["aé", "z"]), ("a".into(), true));
    }
}
