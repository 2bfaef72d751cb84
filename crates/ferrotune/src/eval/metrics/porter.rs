//! The Porter stemmer exactly as NLTK's `PorterStemmer()` runs it in its default
//! `NLTK_EXTENSIONS` mode, which is what `rouge-score` builds for `use_stemmer=True`.
//!
//! This is a line-by-line port of `nltk/stem/porter.py` (nltk 3.10.4), including its deviations
//! from the 1980 paper: the irregular-forms table, words of one or two characters left alone,
//! `-ies`/`-ied` on four-letter words giving `-ie`, the `(*c and not c) Y -> I` rule of step 1c,
//! `alli` tried first in step 2, `bli -> ble` instead of `abli -> able`, the extra `fulli` and
//! `logi` rules, and a two-letter vowel-consonant word counting as `*o`. Rule lists keep NLTK's
//! semantics: the first rule whose suffix matches decides, and a failed condition stops the list.
//! Words are sequences of Unicode scalar values, like Python strings, so lengths agree with
//! Python's `len`. `stems.json` (written by `reference/metrics_fixtures.py`) checks ~6000 words.

type Cond<'a> = &'a dyn Fn(&[char]) -> bool;

/// NLTK's table of irregular forms (checked before anything else).
fn irregular(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Consonant flag of every position: a `y` is a consonant at the start of a word or after a
/// vowel, and a vowel after a consonant (NLTK's `_consonant_flags`).
fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[char], i: usize) -> bool {
    // A position's flag depends only on the letters before it.
    consonant_flags(&w[..=i])[i]
}

/// Porter's m: the number of vowel-to-consonant transitions.
fn measure(stem: &[char]) -> usize {
    let f = consonant_flags(stem);
    f.windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[char]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// `*o`: ends consonant-vowel-consonant, the last not w/x/y; NLTK also counts a two-letter
/// vowel-consonant word.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    n <= w.len() && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

fn strip(w: &[char], suffix: &str) -> Vec<char> {
    w[..w.len() - suffix.chars().count()].to_vec()
}

fn with(mut stem: Vec<char>, replacement: &str) -> Vec<char> {
    stem.extend(replacement.chars());
    stem
}

fn positive_measure(stem: &[char]) -> bool {
    measure(stem) > 0
}

fn measure_gt_1(stem: &[char]) -> bool {
    measure(stem) > 1
}

/// NLTK's `_apply_rule_list` without the `*d` pseudo-suffix (only step 1b uses it, inline).
fn apply_rules(w: Vec<char>, rules: &[(&str, &str, Cond)]) -> Vec<char> {
    for (suffix, replacement, cond) in rules {
        if ends_with(&w, suffix) {
            let stem = strip(&w, suffix);
            return if cond(&stem) {
                with(stem, replacement)
            } else {
                w
            };
        }
    }
    w
}

fn step1a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ies") && w.len() == 4 {
        return with(strip(&w, "ies"), "ie");
    }
    let always: Cond = &|_| true;
    apply_rules(
        w,
        &[
            ("sses", "ss", always),
            ("ies", "i", always),
            ("ss", "ss", always),
            ("s", "", always),
        ],
    )
}

fn step1b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ied") {
        let rep = if w.len() == 4 { "ie" } else { "i" };
        return with(strip(&w, "ied"), rep);
    }
    if ends_with(&w, "eed") {
        let stem = strip(&w, "eed");
        return if measure(&stem) > 0 {
            with(stem, "ee")
        } else {
            w
        };
    }
    let mut inter = None;
    for suffix in ["ed", "ing"] {
        if ends_with(&w, suffix) {
            let s = strip(&w, suffix);
            if contains_vowel(&s) {
                inter = Some(s);
                break;
            }
        }
    }
    let Some(inter) = inter else { return w };
    for (suffix, replacement) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if ends_with(&inter, suffix) {
            return with(strip(&inter, suffix), replacement);
        }
    }
    if ends_double_consonant(&inter) {
        let last = inter[inter.len() - 1];
        return if matches!(last, 'l' | 's' | 'z') {
            inter
        } else {
            inter[..inter.len() - 1].to_vec()
        };
    }
    if measure(&inter) == 1 && ends_cvc(&inter) {
        with(inter, "e")
    } else {
        inter
    }
}

fn step1c(w: Vec<char>) -> Vec<char> {
    let cond: Cond = &|stem| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[("y", "i", cond)])
}

fn step2(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "alli") && positive_measure(&strip(&w, "alli")) {
        return step2(with(strip(&w, "alli"), "al"));
    }
    let m: Cond = &positive_measure;
    // NLTK keeps the `l` of `logi` with the stem for this condition (so `geo-logi` stems).
    let logi_stem: Vec<char> = if w.len() >= 3 {
        w[..w.len() - 3].to_vec()
    } else {
        Vec::new()
    };
    let logi: Cond = &|_| positive_measure(&logi_stem);
    apply_rules(
        w.clone(),
        &[
            ("ational", "ate", m),
            ("tional", "tion", m),
            ("enci", "ence", m),
            ("anci", "ance", m),
            ("izer", "ize", m),
            ("bli", "ble", m),
            ("alli", "al", m),
            ("entli", "ent", m),
            ("eli", "e", m),
            ("ousli", "ous", m),
            ("ization", "ize", m),
            ("ation", "ate", m),
            ("ator", "ate", m),
            ("alism", "al", m),
            ("iveness", "ive", m),
            ("fulness", "ful", m),
            ("ousness", "ous", m),
            ("aliti", "al", m),
            ("iviti", "ive", m),
            ("biliti", "ble", m),
            ("fulli", "ful", m),
            ("logi", "log", logi),
        ],
    )
}

fn step3(w: Vec<char>) -> Vec<char> {
    let m: Cond = &positive_measure;
    apply_rules(
        w,
        &[
            ("icate", "ic", m),
            ("ative", "", m),
            ("alize", "al", m),
            ("iciti", "ic", m),
            ("ical", "ic", m),
            ("ful", "", m),
            ("ness", "", m),
        ],
    )
}

fn step4(w: Vec<char>) -> Vec<char> {
    let m: Cond = &measure_gt_1;
    let ion: Cond = &|stem| measure(stem) > 1 && matches!(stem.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            ("al", "", m),
            ("ance", "", m),
            ("ence", "", m),
            ("er", "", m),
            ("ic", "", m),
            ("able", "", m),
            ("ible", "", m),
            ("ant", "", m),
            ("ement", "", m),
            ("ment", "", m),
            ("ent", "", m),
            ("ion", "", ion),
            ("ou", "", m),
            ("ism", "", m),
            ("ate", "", m),
            ("iti", "", m),
            ("ous", "", m),
            ("ive", "", m),
            ("ize", "", m),
        ],
    )
}

/// Step 5a tries both of its rules (unlike a rule list), as NLTK does.
fn step5a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "e") {
        let stem = strip(&w, "e");
        let m = measure(&stem);
        if m > 1 || (m == 1 && !ends_cvc(&stem)) {
            return stem;
        }
    }
    w
}

fn step5b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ll") && measure(&w[..w.len() - 1]) > 1 {
        return strip(&w, "l");
    }
    w
}

/// `PorterStemmer().stem(word)` (which lowercases first).
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(s) = irregular(&lower) {
        return s.to_string();
    }
    // NLTK measures the length of the word as given, before lowercasing.
    if word.chars().count() <= 2 {
        return lower;
    }
    let mut w: Vec<char> = lower.chars().collect();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    w.into_iter().collect()
}
