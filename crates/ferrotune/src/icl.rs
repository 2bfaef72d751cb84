//! In-context learning: zero/one/few-shot prompts from a JSONL file of examples and a prompt
//! template with `{field}` placeholders (several templates may be given, FLAN style; one is
//! picked per example with a seed).
//!
//! A template describes one whole example, e.g. `"Review: {text}\nSentiment: {label}"`. Shots
//! are rendered in full; the query is rendered up to its first placeholder whose field it lacks,
//! so it ends right where the model should continue (`"Review: ...\nSentiment:"`).
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};
use std::path::Path;

/// A parsed `{field}` template. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    pub fn parse(source: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(Error::msg(format!(
                                    "template {source:?}: unclosed `{{`"
                                )))
                            }
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(Error::msg(format!(
                            "template {source:?}: empty placeholder `{{}}`"
                        )));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => {
                    return Err(Error::msg(format!(
                        "template {source:?}: unmatched `}}` (write `}}}}` for a literal brace)"
                    )))
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn fields(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Field(f) => Some(f.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Render with every placeholder filled; a missing field is an error naming it.
    pub fn render(&self, row: &Map<String, Value>, what: &str) -> Result<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(&field_text(row, f).ok_or_else(|| {
                    Error::msg(match row.get(f.as_str()) {
                        Some(Value::Null) => format!(
                            "{what}: template placeholder `{{{f}}}`: field `{f}` is null in the data"
                        ),
                        _ => format!(
                            "{what}: template placeholder `{{{f}}}` has no field `{f}` in the data"
                        ),
                    })
                })?),
            }
        }
        Ok(out)
    }

    /// Render up to (not including) the first placeholder the row lacks, trailing spaces trimmed.
    pub fn render_query(&self, row: &Map<String, Value>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => match field_text(row, f) {
                    Some(v) => out.push_str(&v),
                    None => return out.trim_end_matches([' ', '\t']).to_string(),
                },
            }
        }
        out
    }
}

fn field_text(row: &Map<String, Value>, f: &str) -> Option<String> {
    match row.get(f)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    }
}

/// Read a JSONL file of objects; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = crate::fsutil::read_input_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => rows.push(m),
            Ok(_) => {
                return Err(Error::file(
                    path,
                    format!("line {}: expected a JSON object", i + 1),
                ))
            }
            Err(e) => {
                return Err(Error::file(
                    path,
                    format!("line {}: invalid JSON: {e}", i + 1),
                ))
            }
        }
    }
    Ok(rows)
}

#[derive(Debug, Clone)]
pub struct FewShot {
    pub templates: Vec<Template>,
    pub shots: Vec<Map<String, Value>>,
    pub k: usize,
    pub separator: String,
    /// Pick shots at random (seeded) instead of the first k.
    pub random: bool,
    pub seed: u64,
}

impl FewShot {
    /// Build the prompt for a query. A query is a JSON object of fields, or plain text that
    /// fills the template's first placeholder.
    pub fn build(&self, query: &str, shots_file: &Path) -> Result<String> {
        if self.templates.is_empty() {
            return Err(Error::msg("--shots needs at least one --template"));
        }
        if self.k > self.shots.len() {
            return Err(Error::file(
                shots_file,
                format!(
                    "--k {} but the file has only {} examples",
                    self.k,
                    self.shots.len()
                ),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let chosen: Vec<usize> = if self.random {
            let mut idx: Vec<usize> = (0..self.shots.len()).collect();
            for i in (1..idx.len()).rev() {
                idx.swap(i, rng.random_range(0..=i));
            }
            idx.truncate(self.k);
            idx
        } else {
            (0..self.k).collect()
        };
        let mut pieces = Vec::new();
        for i in chosen {
            let t = &self.templates[rng.random_range(0..self.templates.len())];
            pieces.push(t.render(
                &self.shots[i],
                &format!("{} line {}", shots_file.display(), i + 1),
            )?);
        }
        let t = &self.templates[rng.random_range(0..self.templates.len())];
        let row = match serde_json::from_str::<Value>(query) {
            Ok(Value::Object(m)) => m,
            _ => {
                let first = t.fields().first().map(|f| f.to_string()).ok_or_else(|| {
                    Error::msg(format!(
                        "template {:?} has no placeholder for the prompt",
                        t.source()
                    ))
                })?;
                let mut m = Map::new();
                m.insert(first, Value::String(query.to_string()));
                m
            }
        };
        pieces.push(t.render_query(&row));
        Ok(pieces.join(&self.separator))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn template_parses_fields_and_escapes() {
        let t = Template::parse("Q: {question} {{x}}\nA: {answer}").unwrap();
        assert_eq!(t.fields(), vec!["question", "answer"]);
        let r = row(serde_json::json!({"question": "2+2?", "answer": 4}));
        assert_eq!(t.render(&r, "x").unwrap(), "Q: 2+2? {x}\nA: 4");
        assert_eq!(
            t.render_query(&row(serde_json::json!({"question": "3+3?"}))),
            "Q: 3+3? {x}\nA:"
        );
    }

    #[test]
    fn a_null_field_is_named_as_null() {
        let t = Template::parse("Q: {question}").unwrap();
        let null = t
            .render(
                &row(serde_json::json!({"question": null})),
                "f.jsonl: line 2",
            )
            .unwrap_err()
            .to_string();
        assert!(
            null.contains("line 2") && null.contains("`question` is null"),
            "{null}"
        );
        let missing = t
            .render(&row(serde_json::json!({})), "x")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("has no field `question`"), "{missing}");
    }

    #[test]
    fn template_errors_are_clear() {
        assert!(Template::parse("a {b")
            .unwrap_err()
            .to_string()
            .contains("unclosed"));
        let t = Template::parse("{a} {b}").unwrap();
        let e = t
            .render(&row(serde_json::json!({"a": 1})), "shots.jsonl line 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shots.jsonl line 3") && e.contains("`b`"), "{e}");
    }

    #[test]
    fn few_shot_prompt_has_k_shots_then_the_query() {
        let shots = vec![
            row(serde_json::json!({"text": "great", "label": "positive"})),
            row(serde_json::json!({"text": "awful", "label": "negative"})),
            row(serde_json::json!({"text": "fine", "label": "positive"})),
        ];
        let fs = FewShot {
            templates: vec![Template::parse("Review: {text}\nSentiment: {label}").unwrap()],
            shots,
            k: 2,
            separator: "\n\n".into(),
            random: false,
            seed: 0,
        };
        let p = fs.build("boring", Path::new("s.jsonl")).unwrap();
        assert_eq!(p, "Review: great\nSentiment: positive\n\nReview: awful\nSentiment: negative\n\nReview: boring\nSentiment:");
        let zero = FewShot { k: 0, ..fs.clone() }
            .build("boring", Path::new("s.jsonl"))
            .unwrap();
        assert_eq!(zero, "Review: boring\nSentiment:");
        let e = FewShot { k: 9, ..fs }
            .build("x", Path::new("s.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 3 examples"), "{e}");
    }
}
