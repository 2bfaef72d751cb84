//! Class labels: the map from a dataset's label values to class ids, for sequence and token
//! classification.
//!
//! - With `labels = ["negative", "positive"]` in `[data]`, class `i` is `labels[i]`: a string
//!   value is looked up in the list, an integer value (a JSON number, or a CSV/TSV cell such as
//!   `"1"`) is the class id itself and must be below the list's length.
//! - Without a list, integer values are the class ids (0..=max seen in training), and string
//!   values get ids in sorted order of the distinct strings seen in training. Either way the map
//!   is recorded ([`LabelMap::names`], `id2label` in the model's config) so evaluation and
//!   inference use the same ids.
//!
//! A value outside the map is a one-line error naming the file, line, field and value.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::read::type_name;
use super::Source;
use crate::{Error, Result};

/// Most classes a classification head may have (a label field holding free text would otherwise
/// make a head with one class per row).
pub const MAX_LABELS: usize = 100_000;

/// Class names by id: class `i` is `names[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelMap {
    pub names: Vec<String>,
    /// Whether the names came from `labels` in the config (string values are looked up by
    /// name) or were inferred from integer values (names are "0", "1", ...).
    #[serde(default)]
    pub from_integers: bool,
}

/// A label value as found in a row.
enum Raw<'a> {
    Int(i64),
    Str(&'a str),
}

fn raw<'a>(v: &'a Value) -> std::result::Result<Raw<'a>, String> {
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Raw::Int(i)),
            None => Err(format!("expected an integer or a string label, found {n}")),
        },
        Value::String(s) => Ok(Raw::Str(s)),
        other => Err(format!(
            "expected an integer or a string label, found {}",
            type_name(other)
        )),
    }
}

/// A string that is a plain decimal integer ("0", "12", "-1"), as CSV/TSV cells hold them.
fn int_text(s: &str) -> Option<i64> {
    let t = s.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

impl LabelMap {
    /// The map from `labels = [...]` in the config. Names must be distinct and non-empty.
    pub fn from_list(names: &[String], what: &str) -> Result<Self> {
        if names.is_empty() {
            return Err(Error::key(what, "labels", "the list is empty"));
        }
        if names.len() > MAX_LABELS {
            return Err(Error::key(
                what,
                "labels",
                format!(
                    "{} labels, more than the limit of {MAX_LABELS}",
                    names.len()
                ),
            ));
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::key(what, "labels", format!("`{n}` appears twice")));
            }
        }
        Ok(LabelMap {
            names: names.to_vec(),
            from_integers: false,
        })
    }

    /// The map inferred from the label values of the training data (`values` with where each
    /// came from): integers (or integer strings) give ids `0..=max`; otherwise the distinct
    /// strings in sorted order. Mixing the two is an error.
    pub fn infer<'a>(
        values: impl IntoIterator<Item = (&'a Value, &'a Source)>,
        field: &str,
    ) -> Result<Self> {
        let mut max_int: Option<i64> = None;
        let mut strings = BTreeSet::new();
        let mut first_int: Option<(&Source, i64)> = None;
        let mut first_str: Option<(&Source, &str)> = None;
        for (v, src) in values {
            let bad = |what: String| Error::msg(format!("{src}: field `{field}`: {what}"));
            match raw(v).map_err(bad)? {
                Raw::Int(i) => {
                    if i < 0 {
                        return Err(Error::msg(format!(
                            "{src}: field `{field}`: label {i} is negative (class ids start at 0)"
                        )));
                    }
                    max_int = Some(max_int.map_or(i, |m| m.max(i)));
                    first_int.get_or_insert((src, i));
                }
                Raw::Str(s) => match int_text(s) {
                    Some(i) if i < 0 => {
                        return Err(Error::msg(format!(
                            "{src}: field `{field}`: label {i} is negative (class ids start at 0)"
                        )))
                    }
                    Some(i) => {
                        max_int = Some(max_int.map_or(i, |m| m.max(i)));
                        first_int.get_or_insert((src, i));
                    }
                    None => {
                        if strings.len() < MAX_LABELS {
                            strings.insert(s.to_string());
                        } else if !strings.contains(s) {
                            return Err(Error::msg(format!(
                                "{src}: field `{field}`: more than {MAX_LABELS} distinct labels (is this the label field?)"
                            )));
                        }
                        first_str.get_or_insert((src, s));
                    }
                },
            }
        }
        match (first_int, first_str, max_int) {
            (Some((isrc, i)), Some((ssrc, s)), _) => Err(Error::msg(format!(
                "field `{field}` mixes integer and string labels ({isrc}: {i}; {ssrc}: \"{}\"); set `labels = [...]` in [data] to name the classes", crate::error::clipped(s)
            ))),
            (_, None, Some(max)) => {
                let n = max as usize + 1;
                if n > MAX_LABELS {
                    return Err(Error::msg(format!(
                        "field `{field}`: label {max} is above the limit of {MAX_LABELS} classes"
                    )));
                }
                Ok(LabelMap {
                    names: (0..n).map(|i| i.to_string()).collect(),
                    from_integers: true,
                })
            }
            (None, Some(_), _) => Ok(LabelMap {
                names: strings.into_iter().collect(),
                from_integers: false,
            }),
            _ => Err(Error::msg(format!("field `{field}`: no labels found"))),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The class id of one label value from `src` (file and line) in `field`.
    pub fn id(&self, v: &Value, src: &Source, field: &str) -> Result<i64> {
        let bad = |what: String| Error::msg(format!("{src}: field `{field}`: {what}"));
        let n = self.names.len();
        let in_range = |i: i64| -> Result<i64> {
            if (0..n as i64).contains(&i) {
                Ok(i)
            } else {
                Err(bad(format!(
                    "label {i} is out of range: there are {n} classes (0..={})",
                    n.saturating_sub(1)
                )))
            }
        };
        match raw(v).map_err(bad)? {
            Raw::Int(i) => in_range(i),
            Raw::Str(s) => {
                if let Some(i) = self.names.iter().position(|name| name == s) {
                    return Ok(i as i64);
                }
                match int_text(s) {
                    Some(i) => in_range(i),
                    None => Err(bad(format!(
                        "label \"{}\" is not one of the labels ({})",
                        crate::error::clipped(s),
                        self.preview_names()
                    ))),
                }
            }
        }
    }

    /// The names for an error message (the first few).
    fn preview_names(&self) -> String {
        let shown: Vec<String> = self
            .names
            .iter()
            .take(10)
            .map(|n| crate::error::clipped(n))
            .collect();
        let more = if self.names.len() > 10 {
            format!(", ... {} in all", self.names.len())
        } else {
            String::new()
        };
        format!("{}{more}", shown.join(", "))
    }

    /// `id2label` and `label2id` as transformers writes them into a model's `config.json`.
    pub fn hf_config(&self) -> serde_json::Value {
        let id2label: serde_json::Map<String, Value> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), Value::String(n.clone())))
            .collect();
        let label2id: serde_json::Map<String, Value> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), Value::from(i)))
            .collect();
        serde_json::json!({"id2label": id2label, "label2id": label2id})
    }
}
