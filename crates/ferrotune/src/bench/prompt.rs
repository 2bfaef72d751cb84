//! A task's prompts, built as lm-eval builds them: `doc_to_text` / `doc_to_target` /
//! `doc_to_choice` (a field name, a Jinja template, an index or a list), the description, and
//! the few-shot context (`build_qa_turn`: question + target delimiter + answer + few-shot
//! delimiter per example, then the question alone; with a chat template, everything collapsed
//! into one user turn as lm-eval's `multiturn_to_singleturn` does).
use super::docs::Doc;
use super::task::TaskConfig;
use crate::tokenizer::{ChatMessage, ChatTemplate};
use crate::{Error, Result};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

pub use crate::data::template::MAX_TEMPLATE_FUEL;
/// The longest prompt a template may render, or few-shot examples may make (far beyond any
/// context window).
pub const MAX_PROMPT_BYTES: usize = crate::data::template::MAX_RENDER_BYTES;

/// Prompt building for one task. Templates are compiled once, at construction.
pub struct Prompter<'t> {
    pub task: &'t TaskConfig,
    env: Environment<'static>,
    /// The dataset's columns: a `doc_to_*` string naming one reads that field.
    features: Vec<String>,
    /// `doc_to_text` gives the index of the right context among the choices (Winogrande style:
    /// each choice is a context, the target the shared continuation).
    pub multiple_input: bool,
}

/// lm-eval's Jinja filter `regex_replace(s, pattern, replacement)`.
fn regex_replace(s: String, pattern: String, repl: String) -> Result<String, minijinja::Error> {
    let re = fancy_regex::Regex::new(&pattern).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("regex_replace: {e}"),
        )
    })?;
    // Python's `\1` backreferences become the regex crate's `${1}`.
    let repl = python_backrefs(&repl);
    Ok(re.replace_all(&s, repl.as_str()).into_owned())
}

fn python_backrefs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// Python methods the templates of lm-eval's tasks call that minijinja's pycompat lacks:
/// `list.index(x)` and `str.index(x)` / `str.find(x)` (character offsets).
fn unknown_method(
    state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, minijinja::Error> {
    use minijinja::{Error as JErr, ErrorKind, Value as V};
    match (method, args) {
        ("index" | "find", [needle]) => {
            if let Some(s) = value.as_str() {
                let n = needle.as_str().unwrap_or_default();
                return match s.find(n) {
                    Some(b) => Ok(V::from(s[..b].chars().count())),
                    None if method == "find" => Ok(V::from(-1)),
                    None => Err(JErr::new(
                        ErrorKind::InvalidOperation,
                        "substring not found",
                    )),
                };
            }
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if &item == needle {
                        return Ok(V::from(i));
                    }
                }
                return Err(JErr::new(
                    ErrorKind::InvalidOperation,
                    format!("{needle} is not in list"),
                ));
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        }
        _ => minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
    }
}

impl<'t> Prompter<'t> {
    pub fn new(task: &'t TaskConfig, first_doc: &Doc) -> Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_unknown_method_callback(unknown_method);
        env.add_filter("regex_replace", regex_replace);
        // A template is user input: bound the work of one render (nested loops) …
        env.set_fuel(Some(MAX_TEMPLATE_FUEL));
        let src = task.file.display().to_string();
        let specs = [
            ("doc_to_text", task.doc_to_text.as_ref()),
            ("doc_to_target", task.doc_to_target.as_ref()),
            ("doc_to_choice", task.doc_to_choice.as_ref()),
            (
                "fewshot_config.doc_to_text",
                task.fewshot.doc_to_text.as_ref(),
            ),
            (
                "fewshot_config.doc_to_target",
                task.fewshot.doc_to_target.as_ref(),
            ),
            (
                "fewshot_config.doc_to_choice",
                task.fewshot.doc_to_choice.as_ref(),
            ),
        ];
        let features: Vec<String> = first_doc.keys().cloned().collect();
        for (key, spec) in specs {
            if let Some(Value::String(s)) = spec {
                if !features.contains(s) {
                    env.add_template_owned(key.to_string(), s.clone())
                        .map_err(|e| {
                            Error::key(&src, key, format!("template: {}", jinja_msg(&e)))
                        })?;
                }
            }
        }
        if !task.description.is_empty() && !features.contains(&task.description) {
            env.add_template_owned("description".to_string(), task.description.clone())
                .map_err(|e| {
                    Error::key(&src, "description", format!("template: {}", jinja_msg(&e)))
                })?;
        }
        let mut p = Self {
            task,
            env,
            features,
            multiple_input: false,
        };
        if task.doc_to_choice.is_some() {
            let t = p.text(first_doc, 0, false)?;
            p.multiple_input = matches!(t, Value::Number(_));
        }
        Ok(p)
    }

    fn spec(&self, key: &str, fewshot: bool) -> Option<&'t Value> {
        let t = self.task;
        let (main, fs) = match key {
            "doc_to_text" => (t.doc_to_text.as_ref(), t.fewshot.doc_to_text.as_ref()),
            "doc_to_target" => (t.doc_to_target.as_ref(), t.fewshot.doc_to_target.as_ref()),
            _ => (t.doc_to_choice.as_ref(), t.fewshot.doc_to_choice.as_ref()),
        };
        if fewshot {
            fs.or(main)
        } else {
            main
        }
    }

    fn template_name(key: &str, fewshot: bool, t: &TaskConfig) -> String {
        let has_fs = match key {
            "doc_to_text" => t.fewshot.doc_to_text.is_some(),
            "doc_to_target" => t.fewshot.doc_to_target.is_some(),
            _ => t.fewshot.doc_to_choice.is_some(),
        };
        if fewshot && has_fs {
            format!("fewshot_config.{key}")
        } else {
            key.to_string()
        }
    }

    /// Fail with the field a template reads that the document lacks, by name and sample index.
    fn check_fields(&self, name: &str, doc: &Doc, idx: usize) -> Result<()> {
        let Ok(tmpl) = self.env.get_template(name) else {
            return Ok(());
        };
        let mut vars: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
        vars.sort();
        for v in vars {
            if !doc.contains_key(&v) && self.env.globals().all(|(g, _)| g != v) {
                let mut have: Vec<&str> = doc.keys().map(String::as_str).collect();
                have.sort();
                return Err(Error::key(
                    self.task.file.display().to_string(),
                    name,
                    format!(
                        "sample {idx}: the template reads field `{v}`, which the document lacks (fields: {})",
                        have.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn render(&self, name: &str, doc: &Doc, idx: usize) -> Result<String> {
        self.check_fields(name, doc, idx)?;
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| Error::msg(format!("{name}: {}", jinja_msg(&e))))?;
        let out = crate::data::template::render_capped(&tmpl, doc).map_err(|e| {
            Error::key(
                self.task.file.display().to_string(),
                name,
                format!("sample {idx}: {}", jinja_msg(&e)),
            )
        })?;
        // … and the size of what it gives.
        if out.len() > MAX_PROMPT_BYTES {
            return Err(Error::key(
                self.task.file.display().to_string(),
                name,
                format!(
                    "sample {idx}: the template gave {} bytes, more than the {MAX_PROMPT_BYTES} a prompt may have",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }

    /// A template that is one `{{ expression }}`, evaluated to a value (a list stays a list,
    /// where Python's Jinja would print it and lm-eval parse it back with `literal_eval`).
    fn eval_expression(
        &self,
        source: &str,
        doc: &Doc,
        name: &str,
        idx: usize,
    ) -> Result<Option<Value>> {
        let s = source.trim();
        let Some(inner) = s.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) else {
            return Ok(None);
        };
        if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
            return Ok(None);
        }
        self.check_fields(name, doc, idx)?;
        let expr = self.env.compile_expression(inner.trim()).map_err(|e| {
            Error::key(
                self.task.file.display().to_string(),
                name,
                format!("template: {}", jinja_msg(&e)),
            )
        })?;
        let v = expr.eval(doc).map_err(|e| {
            Error::key(
                self.task.file.display().to_string(),
                name,
                format!("sample {idx}: {}", jinja_msg(&e)),
            )
        })?;
        if v.as_str().is_some() {
            return Ok(None);
        }
        Ok(serde_json::to_value(&v).ok())
    }

    /// `doc_to_text`: a string, or (multiple-input tasks) the index of the right context.
    pub fn text(&self, doc: &Doc, idx: usize, fewshot: bool) -> Result<Value> {
        let has_choice = self.task.doc_to_choice.is_some();
        match self.spec("doc_to_text", fewshot) {
            None => Err(Error::key(
                self.task.file.display().to_string(),
                "doc_to_text",
                "missing",
            )),
            Some(v @ Value::Number(_)) => Ok(v.clone()),
            Some(Value::String(s)) if self.features.contains(s) => field(doc, s, idx, self.task),
            Some(Value::String(_)) => {
                let name = Self::template_name("doc_to_text", fewshot, self.task);
                let out = self.render(&name, doc, idx)?;
                if has_choice && is_digits(&out) {
                    if let Ok(n) = out.parse::<u64>() {
                        return Ok(Value::from(n));
                    }
                }
                Ok(Value::String(out))
            }
            Some(_) => Err(Error::key(
                self.task.file.display().to_string(),
                "doc_to_text",
                "expected a template or a field name",
            )),
        }
    }

    /// `doc_to_target`: an index into the choices, a string, or a list of them.
    pub fn target(&self, doc: &Doc, idx: usize, fewshot: bool) -> Result<Value> {
        let has_choice = self.task.doc_to_choice.is_some();
        match self.spec("doc_to_target", fewshot) {
            None => Ok(Value::Null),
            Some(v @ (Value::Number(_) | Value::Array(_))) => Ok(v.clone()),
            Some(Value::String(s)) if self.features.contains(s) => field(doc, s, idx, self.task),
            Some(Value::String(s)) => {
                let name = Self::template_name("doc_to_target", fewshot, self.task);
                if let Some(v @ (Value::Array(_) | Value::Number(_))) =
                    self.eval_expression(s, doc, &name, idx)?
                {
                    return Ok(v);
                }
                let out = self.render(&name, doc, idx)?;
                if has_choice && is_digits(&out) {
                    if let Ok(n) = out.parse::<u64>() {
                        return Ok(Value::from(n));
                    }
                }
                if out.len() >= 2 && out.starts_with('[') && out.ends_with(']') {
                    if let Some(v) = parse_list_literal(&out) {
                        return Ok(v);
                    }
                }
                Ok(Value::String(out))
            }
            Some(_) => Err(Error::key(
                self.task.file.display().to_string(),
                "doc_to_target",
                "unsupported value",
            )),
        }
    }

    /// `doc_to_choice`: the choices, as strings.
    pub fn choices(&self, doc: &Doc, idx: usize, fewshot: bool) -> Result<Vec<String>> {
        let src = self.task.file.display().to_string();
        let v = match self.spec("doc_to_choice", fewshot) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) if self.features.contains(s) => field(doc, s, idx, self.task)?,
            Some(Value::String(s)) => {
                let name = Self::template_name("doc_to_choice", fewshot, self.task);
                match self.eval_expression(s, doc, &name, idx)? {
                    Some(v) => v,
                    None => {
                        let out = self.render(&name, doc, idx)?;
                        parse_list_literal(&out).ok_or_else(|| {
                            Error::key(
                                &src,
                                "doc_to_choice",
                                format!("sample {idx}: the template gave {out:?}, not a list"),
                            )
                        })?
                    }
                }
            }
            Some(v) => v.clone(),
        };
        let Value::Array(items) = v else {
            return Err(Error::key(
                &src,
                "doc_to_choice",
                format!("sample {idx}: expected a list of choices"),
            ));
        };
        if items.is_empty() {
            return Err(Error::key(
                &src,
                "doc_to_choice",
                format!("sample {idx}: no choices"),
            ));
        }
        Ok(items.iter().map(value_text).collect())
    }

    pub fn description(&self, doc: &Doc, idx: usize) -> Result<String> {
        let d = &self.task.description;
        if d.is_empty() {
            return Ok(String::new());
        }
        if self.features.contains(d) {
            return field(doc, d, idx, self.task).map(|v| value_text(&v));
        }
        self.render("description", doc, idx)
    }

    /// The answer text of a few-shot example (lm-eval's `build_qa_turn`).
    fn answer_text(&self, a: &Value, choices: Option<&[String]>, idx: usize) -> Result<String> {
        match (a, choices) {
            (Value::Number(n), Some(c)) => n
                .as_u64()
                .and_then(|i| c.get(i as usize))
                .cloned()
                .ok_or_else(|| self.bad_target(idx, a, c.len())),
            (Value::Array(v), _) => v
                .first()
                .map(value_text)
                .ok_or_else(|| self.bad_target(idx, a, 0)),
            (v, _) => Ok(value_text(v)),
        }
    }

    fn bad_target(&self, idx: usize, a: &Value, n: usize) -> Error {
        Error::key(
            self.task.file.display().to_string(),
            "doc_to_target",
            format!("sample {idx}: target {a} is not one of the {n} choices (an index from 0, or a choice's text)"),
        )
    }

    /// The prompt(s) for `doc`: one context, or (multiple-input tasks) one per choice.
    /// `shots` are the few-shot examples (with their indices in their split, for messages).
    pub fn contexts(
        &self,
        doc: &Doc,
        idx: usize,
        shots: &[(usize, &Doc)],
        chat: Option<&ChatTemplate>,
    ) -> Result<Vec<String>> {
        let t = self.task;
        let mut msgs: Vec<(&'static str, String, String)> = Vec::new();
        let description = self.description(doc, idx)?;
        if !description.is_empty() {
            msgs.push(("system", description, String::new()));
        }
        let tgt_delim = t
            .fewshot
            .target_delimiter
            .clone()
            .unwrap_or_else(|| t.target_delimiter.clone());
        let few_delim = t
            .fewshot
            .fewshot_delimiter
            .clone()
            .unwrap_or_else(|| t.fewshot_delimiter.clone());
        // Each render is capped, but num_fewshot of them are joined: the whole context is
        // capped too, as it grows (250 shots of 15 MB each aborted on a failed allocation).
        let mut context_bytes = msgs.iter().map(|(_, c, _)| c.len()).sum::<usize>();
        let too_big = || {
            Error::key(
                t.file.display().to_string(),
                "num_fewshot",
                format!(
                    "sample {idx}: its {} few-shot examples come to more than the {MAX_PROMPT_BYTES} bytes a prompt may have",
                    shots.len()
                ),
            )
        };
        for (si, sd) in shots {
            if context_bytes > MAX_PROMPT_BYTES {
                return Err(too_big());
            }
            let q = self.text(sd, *si, true)?;
            let c = if t.doc_to_choice.is_some() {
                Some(self.choices(sd, *si, true)?)
            } else {
                None
            };
            let a = self.target(sd, *si, true)?;
            let (q, c) = if self.multiple_input {
                let cs = c.unwrap_or_default();
                let i = q.as_u64().unwrap_or(u64::MAX) as usize;
                let q = cs
                    .get(i)
                    .cloned()
                    .ok_or_else(|| self.bad_target(*si, &q, cs.len()))?;
                (q, None)
            } else {
                (value_text(&q), c)
            };
            let has_answer = !(a.is_null() || a == Value::String(String::new()));
            context_bytes += q.len() + tgt_delim.len() + few_delim.len();
            msgs.push((
                "user",
                q,
                if has_answer {
                    tgt_delim.clone()
                } else {
                    String::new()
                },
            ));
            if has_answer {
                let answer = self.answer_text(&a, c.as_deref(), *si)?;
                context_bytes += answer.len();
                msgs.push(("assistant", answer, few_delim.clone()));
            }
        }
        if context_bytes > MAX_PROMPT_BYTES {
            return Err(too_big());
        }
        let questions: Vec<String> = if self.multiple_input {
            self.choices(doc, idx, false)?
        } else {
            vec![value_text(&self.text(doc, idx, false)?)]
        };
        questions
            .into_iter()
            .map(|q| {
                let mut m = msgs.clone();
                m.push(("user", q, String::new()));
                match chat {
                    None => Ok(m
                        .iter()
                        .map(|(_, c, d)| format!("{c}{d}"))
                        .collect::<String>()),
                    Some(tmpl) => render_single_turn(tmpl, m),
                }
            })
            .collect()
    }
}

/// lm-eval's `multiturn_to_singleturn` then the chat template with a generation prompt.
fn render_single_turn(
    tmpl: &ChatTemplate,
    mut m: Vec<(&'static str, String, String)>,
) -> Result<String> {
    let system = if m.first().is_some_and(|x| x.0 == "system") {
        Some(m.remove(0))
    } else {
        None
    };
    if let Some(last) = m.last_mut() {
        last.2 = String::new();
    }
    let user: String = m.iter().map(|(_, c, d)| format!("{c}{d}")).collect();
    let mut msgs = Vec::new();
    if let Some((_, c, _)) = system {
        msgs.push(ChatMessage::new("system", c));
    }
    msgs.push(ChatMessage::new("user", user));
    tmpl.render(&msgs, true, &Value::Null)
}

fn field(doc: &Doc, name: &str, idx: usize, t: &TaskConfig) -> Result<Value> {
    doc.get(name).cloned().ok_or_else(|| {
        Error::key(
            t.file.display().to_string(),
            name,
            format!("sample {idx}: the document has no field `{name}`"),
        )
    })
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// A value as prompt text: strings as they are, anything else as JSON.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `ast.literal_eval` of a list printed by a template: JSON, or Python's repr with single quotes.
pub fn parse_list_literal(s: &str) -> Option<Value> {
    if let Ok(v @ Value::Array(_)) = serde_json::from_str::<Value>(s) {
        return Some(v);
    }
    // Python repr: rewrite single-quoted strings as JSON strings.
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\'' {
            let mut lit = String::new();
            loop {
                match chars.next()? {
                    '\\' => {
                        let e = chars.next()?;
                        lit.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    }
                    '\'' => break,
                    ch => lit.push(ch),
                }
            }
            out.push_str(&serde_json::to_string(&lit).ok()?);
        } else {
            out.push(c);
        }
    }
    match serde_json::from_str::<Value>(&out) {
        Ok(v @ Value::Array(_)) => Some(v),
        _ => None,
    }
}

fn jinja_msg(e: &minijinja::Error) -> String {
    if let Some(m) = crate::data::template::limit_msg(e) {
        return m;
    }
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}
