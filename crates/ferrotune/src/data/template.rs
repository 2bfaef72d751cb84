//! Prompt and completion templates.
//!
//! A template is either `{field}` text (parsed by [`crate::icl::Template`], where `{{`/`}}` are
//! literal braces) or, when it contains `{{` or `{%`, a Jinja template rendered by minijinja with
//! the row's fields as variables and strict undefined (so `{{ row.typo }}` is an error, not "").
//! Several prompt templates can be given for one task; each example gets one, picked by a hash of
//! the seed and its line, so the choice does not depend on the order examples are processed in.
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use super::{Row, Source};
use crate::icl::Template;
use crate::{Error, Result};

const NAME: &str = "t";

/// One prompt or completion template.
#[derive(Debug, Clone)]
pub enum PromptTemplate {
    Fields(Template),
    Jinja {
        source: String,
        env: Arc<Environment<'static>>,
        /// Top-level variables the template reads, checked against each row before rendering
        /// so that a missing one is reported by name.
        vars: Vec<String>,
    },
}

impl PromptTemplate {
    pub fn parse(source: &str) -> Result<Self> {
        if !(source.contains("{{") || source.contains("{%")) {
            return Ok(PromptTemplate::Fields(Template::parse(source)?));
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // A prompt that ends in "\n" must keep it: it is part of what the model is shown.
        env.set_keep_trailing_newline(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(MAX_TEMPLATE_FUEL));
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::msg(format!("template {source:?}: {}", jinja_msg(&e))))?;
        let tmpl = env.get_template(NAME).expect("just added");
        let globals: Vec<&str> = env.globals().map(|(k, _)| k).collect();
        let mut vars: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !globals.contains(&v.as_str()))
            .collect();
        vars.sort();
        Ok(PromptTemplate::Jinja {
            source: source.to_string(),
            env: Arc::new(env),
            vars,
        })
    }

    pub fn source(&self) -> &str {
        match self {
            PromptTemplate::Fields(t) => t.source(),
            PromptTemplate::Jinja { source, .. } => source,
        }
    }

    /// The fields of a row the template reads.
    pub fn fields(&self) -> Vec<String> {
        match self {
            PromptTemplate::Fields(t) => t.fields().into_iter().map(str::to_string).collect(),
            PromptTemplate::Jinja { vars, .. } => vars.clone(),
        }
    }

    /// Render with a row's fields; a field the row lacks (or has as null) is an error naming
    /// `src` (file and line) and the field.
    pub fn render(&self, row: &Map<String, Value>, src: &Source) -> Result<String> {
        match self {
            PromptTemplate::Fields(t) => t.render(row, &src.to_string()),
            PromptTemplate::Jinja { env, vars, .. } => {
                if let Some(v) = vars
                    .iter()
                    .find(|v| matches!(row.get(v.as_str()), None | Some(Value::Null)))
                {
                    return Err(Error::msg(if row.get(v.as_str()).is_some() {
                        format!(
                            "{src}: template placeholder `{v}`: field `{v}` is null in the data"
                        )
                    } else {
                        format!("{src}: template placeholder `{v}` has no field `{v}` in the data")
                    }));
                }
                let tmpl = env.get_template(NAME).expect("added at parse");
                render_capped(&tmpl, minijinja::Value::from_serialize(row))
                    .map_err(|e| Error::msg(format!("{src}: template: {}", jinja_msg(&e))))
            }
        }
    }
}

/// The most work one render of a user's template may do (minijinja's fuel: about one unit per
/// instruction), so a nested loop in a template ends in an error instead of hanging. Prompt,
/// chat and benchmark templates take well under 100,000.
pub const MAX_TEMPLATE_FUEL: u64 = 20_000_000;

/// The most text one render of a user's template may write (far beyond any context window).
pub const MAX_RENDER_BYTES: usize = 16 << 20;

/// A writer that refuses to hold more than its cap: the render stops with an error at the cap
/// instead of building the whole text first (a loop printing a 100 MB string ran out of memory).
struct CappedText {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedText {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(b.len()) > self.cap {
            return Err(std::io::Error::other(RENDER_CAP_HIT));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const RENDER_CAP_HIT: &str = "render cap";

/// `tmpl` rendered with `ctx`, writing at most [`MAX_RENDER_BYTES`]; past them, an error whose
/// message [`limit_msg`] turns into one saying so.
pub(crate) fn render_capped<S: serde::Serialize>(
    tmpl: &minijinja::Template<'_, '_>,
    ctx: S,
) -> std::result::Result<String, minijinja::Error> {
    let mut out = CappedText {
        buf: Vec::new(),
        cap: MAX_RENDER_BYTES,
    };
    tmpl.render_captured_to(ctx, &mut out)?;
    // minijinja writes `str` pieces, but a cut could only come from the cap, which errs first
    String::from_utf8(out.buf).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            "output is not UTF-8",
        )
    })
}

/// The message for a render stopped by one of the limits every user template runs under (the
/// work bound [`MAX_TEMPLATE_FUEL`], the output cap [`MAX_RENDER_BYTES`]), if `e` is one.
pub(crate) fn limit_msg(e: &minijinja::Error) -> Option<String> {
    match e.kind() {
        minijinja::ErrorKind::OutOfFuel => Some(format!(
            "the template does more than {MAX_TEMPLATE_FUEL} steps of work (a loop too long?)"
        )),
        minijinja::ErrorKind::WriteFailure => Some(format!(
            "the template writes more than {MAX_RENDER_BYTES} bytes (a loop printing too much?)"
        )),
        _ => None,
    }
}

fn jinja_msg(e: &minijinja::Error) -> String {
    if let Some(m) = limit_msg(e) {
        return m;
    }
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The prompt templates of a task (one picked per example) and its completion template.
#[derive(Debug, Clone)]
pub struct TemplateSet {
    pub prompts: Vec<PromptTemplate>,
    pub completion: PromptTemplate,
    pub seed: u64,
}

impl TemplateSet {
    pub fn new(prompts: &[String], completion: &str, seed: u64) -> Result<Self> {
        if prompts.is_empty() {
            return Err(Error::msg("at least one prompt template is needed"));
        }
        Ok(TemplateSet {
            prompts: prompts
                .iter()
                .map(|p| PromptTemplate::parse(p))
                .collect::<Result<_>>()?,
            completion: PromptTemplate::parse(completion)?,
            seed,
        })
    }

    /// Which prompt template a row gets: a function of the seed and the row's position only.
    pub fn pick(&self, row: &Row) -> usize {
        let n = match row.loc {
            super::Loc::Line(n) => n as u64,
            super::Loc::Row(n) => (n as u64) | (1 << 63),
        };
        (splitmix64(self.seed ^ splitmix64(n)) % self.prompts.len() as u64) as usize
    }

    /// The prompt and completion text of a row.
    pub fn render(&self, row: &Row, src: &Source) -> Result<(String, String)> {
        let prompt = self.prompts[self.pick(row)].render(&row.fields, src)?;
        let completion = self.completion.render(&row.fields, src)?;
        Ok((prompt, completion))
    }
}

/// A 64-bit mixing function (SplitMix64's finalizer): nearby inputs give unrelated outputs.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Loc;
    use serde_json::json;
    use std::path::Path;

    fn row(line: usize, v: Value) -> Row {
        Row {
            loc: Loc::Line(line),
            fields: v.as_object().unwrap().clone(),
        }
    }

    fn src(line: usize) -> Source {
        Source {
            file: Arc::from(Path::new("d/train.jsonl")),
            loc: Loc::Line(line),
            task: None,
        }
    }

    #[test]
    fn field_templates_render_and_report_missing_fields() {
        let t = PromptTemplate::parse("Dialogue: {dialogue}\nSummary:").unwrap();
        assert!(matches!(t, PromptTemplate::Fields(_)));
        assert_eq!(t.fields(), vec!["dialogue"]);
        let r = row(1, json!({"dialogue": "hi", "n": 3}));
        assert_eq!(
            t.render(&r.fields, &src(1)).unwrap(),
            "Dialogue: hi\nSummary:"
        );
        let e = t
            .render(&row(7, json!({"dlg": "x"})).fields, &src(7))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d/train.jsonl: line 7") && e.contains("`dialogue`"),
            "{e}"
        );
    }

    #[test]
    fn jinja_templates_render_with_strict_undefined() {
        let t =
            PromptTemplate::parse("{% if topic %}[{{ topic | upper }}] {% endif %}{{ text }}\n")
                .unwrap();
        assert!(matches!(t, PromptTemplate::Jinja { .. }));
        assert_eq!(t.fields(), vec!["text", "topic"]);
        let r = row(1, json!({"text": "hello", "topic": "greeting"}));
        assert_eq!(t.render(&r.fields, &src(1)).unwrap(), "[GREETING] hello\n");
        let e = t
            .render(&row(4, json!({"topic": "x"})).fields, &src(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4") && e.contains("`text`"), "{e}");
        // A nested attribute the row lacks is caught by strict undefined at render time.
        let t = PromptTemplate::parse("{{ meta.title }}").unwrap();
        let e = t
            .render(&row(2, json!({"meta": {}})).fields, &src(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("undefined"), "{e}");
        assert!(PromptTemplate::parse("{% if x %}").is_err());
        // 10^10 loop steps: an error once the fuel is spent, not a hang
        let t = PromptTemplate::parse(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ text }}",
        )
        .unwrap();
        let e = t
            .render(&row(3, json!({"text": "x"})).fields, &src(3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("steps of work"), "{e}");
        // 1,000 prints of a 10 MB string: stopped at the cap, not built whole
        let t = PromptTemplate::parse(
            "{% set big = 'a' * 10000000 %}{% for i in range(1000) %}{{ big }}{% endfor %}{{ text }}",
        )
        .unwrap();
        let e = t
            .render(&row(3, json!({"text": "x"})).fields, &src(3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("writes more than"),
            "{e}"
        );
    }

    #[test]
    fn template_pick_is_seeded_per_row_and_uses_every_template() {
        let prompts: Vec<String> = (0..3).map(|i| format!("T{i} {{x}}")).collect();
        let set = TemplateSet::new(&prompts, " {y}", 17).unwrap();
        let rows: Vec<Row> = (1..=300).map(|i| row(i, json!({"x": i, "y": 0}))).collect();
        let picks: Vec<usize> = rows.iter().map(|r| set.pick(r)).collect();
        // Same seed, same picks (in any order); another seed, other picks.
        let again: Vec<usize> = rows.iter().rev().map(|r| set.pick(r)).collect();
        assert_eq!(picks, again.into_iter().rev().collect::<Vec<_>>());
        let other = TemplateSet {
            seed: 18,
            ..set.clone()
        };
        assert_ne!(
            picks,
            rows.iter().map(|r| other.pick(r)).collect::<Vec<_>>()
        );
        for k in 0..3 {
            let count = picks.iter().filter(|&&p| p == k).count();
            assert!(
                (60..140).contains(&count),
                "template {k} picked {count}/300 times"
            );
        }
        let (p, c) = set.render(&rows[4], &src(5)).unwrap();
        assert_eq!(p, format!("T{} 5", picks[4]));
        assert_eq!(c, " 0");
    }
}
