//! Jinja chat templates, rendered the way transformers' `apply_chat_template` does.
//!
//! transformers renders with jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls), adds
//! `raise_exception`, `strftime_now` and a `tojson` that is Python's `json.dumps`, and passes
//! `messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens. We do the
//! same with minijinja plus minijinja-contrib's pycompat (`.strip()`, `.startswith()`, `.items()`...).
//!
//! Undefined values: a variable the template prints, iterates, indexes or passes to a filter but
//! that nobody defined is an error (so a typo or a missing `extra` variable is caught). Testing an
//! undefined value for truth (`{% if message.tool_calls %}`) is allowed and false, because
//! real templates (Qwen2.5, Llama 3.1...) probe optional message keys that way.
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Set when the source did not compile (see [`ChatTemplate::compile`]); `render` returns it.
    compile_error: Option<String>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compile `source`. `bos_token`/`eos_token` are the texts the template sees as `bos_token` /
    /// `eos_token` (an empty string when the tokenizer has none).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let t = Self::compile(source, bos_token, eos_token);
        match &t.compile_error {
            Some(msg) => Err(Error::Template(msg.clone())),
            None => Ok(t),
        }
    }

    /// Like [`ChatTemplate::new`], but a template that does not compile is kept and reports its
    /// error when rendered. Model loaders use this so that a template minijinja cannot parse
    /// only breaks chat formatting, not loading the model for plain prompts.
    pub fn compile(
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Self {
        let source = source.into();
        let mut env = Environment::new();
        // jinja2 settings transformers uses (ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks)).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // A template comes with a downloaded model: bound its work (a nested loop hung here).
        env.set_fuel(Some(crate::data::template::MAX_TEMPLATE_FUEL));
        let compile_error = env
            .add_template_owned(NAME, source.clone())
            .err()
            .map(|e| template_msg(&e, &source));
        ChatTemplate {
            env,
            compile_error,
            source,
            bos_token: bos_token.unwrap_or("").to_string(),
            eos_token: eos_token.unwrap_or("").to_string(),
        }
    }

    /// Name where the template came from in its compile error (a file, a GGUF key), which
    /// `render` returns: the error then says which template broke.
    pub fn with_origin(mut self, origin: &str) -> Self {
        if let Some(e) = &mut self.compile_error {
            *e = format!("{origin}: {e}");
        }
        self
    }

    /// Why the template cannot be rendered, if it did not compile.
    pub fn compile_error(&self) -> Option<&str> {
        self.compile_error.as_deref()
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation. `extra` is a JSON object of further variables (e.g. `tools`,
    /// `enable_thinking`, `date_string`); its keys override the defaults. Pass `Value::Null` for none.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String> {
        if let Some(msg) = &self.compile_error {
            return Err(Error::Template(msg.clone()));
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| Error::Template(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        // transformers always passes these, as None when absent.
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        match extra {
            serde_json::Value::Null => {}
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    ctx.insert(k.clone(), v.clone());
                }
            }
            other => {
                return Err(Error::Template(format!(
                    "extra variables must be a JSON object, got `{other}`"
                )))
            }
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&e, &self.source))?;
        crate::data::template::render_capped(&tmpl, Value::from_serialize(&ctx))
            .map_err(|e| template_error(&e, &self.source))
    }
}

fn template_error(e: &minijinja::Error, source: &str) -> Error {
    Error::Template(template_msg(e, source))
}

/// One line: what went wrong, the offending source text (e.g. the undefined variable) and the line.
fn template_msg(e: &minijinja::Error, source: &str) -> String {
    if let Some(m) = crate::data::template::limit_msg(e) {
        return m;
    }
    // `raise_exception` messages are the template author's words; show them as they are.
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
            return one_line(msg);
        }
    }
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(r) = e.range() {
        if let Some(snippet) = source.get(r).map(str::trim).filter(|s| !s.is_empty()) {
            msg.push_str(&format!(" `{}`", one_line(snippet)));
        }
    }
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    one_line(&msg)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

const RAISED: &str = "raise_exception: ";

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// `strftime_now(fmt)`: the current UTC time formatted with C `strftime` specifiers (the common ones).
fn strftime_now(fmt: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

pub(crate) fn strftime(fmt: &str, unix_secs: i64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = chars.next().ok_or_else(|| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: format ends with `%`",
            )
        })?;
        let s = match spec {
            'Y' => y.to_string(),
            'y' => format!("{:02}", y.rem_euclid(100)),
            'm' => format!("{m:02}"),
            'd' => format!("{d:02}"),
            'e' => format!("{d:>2}"),
            'B' => MONTHS[m as usize - 1].to_string(),
            'b' | 'h' => MONTHS[m as usize - 1][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'H' => format!("{hh:02}"),
            'I' => format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 }),
            'p' => (if hh < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{mm:02}"),
            'S' => format!("{ss:02}"),
            'j' => format!("{yday:03}"),
            'F' => format!("{y}-{m:02}-{d:02}"),
            'T' => format!("{hh:02}:{mm:02}:{ss:02}"),
            '%' => "%".to_string(),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format specifier `%{other}`"),
                ))
            }
        };
        out.push_str(&s);
    }
    Ok(out)
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. minijinja's own `tojson` is compact and
/// HTML-escapes `<`/`>`/`&`, which would change the prompt the model sees.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: bad indent {v}"),
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        // Python's defaults: ", " without indent, "," with indent (so lines carry no trailing space).
        None => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    py_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn py_json(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                // Integers print exactly (i128/u128 included) through Display.
                out.push_str(&v.to_string());
                return Ok(());
            }
            let f = f64::try_from(v.clone()).map_err(|_| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad number")
            })?;
            out.push_str(&py_float(f));
        }
        ValueKind::String => py_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                py_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => py_str(s, o.ensure_ascii, out),
                    // Python turns non-string keys into strings.
                    None => py_str(&k.to_string(), o.ensure_ascii, out),
                }
                out.push_str(&o.key_sep);
                py_json(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => py_str(&v.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

/// Python `repr(float)`: shortest round-trip digits, always with a `.0` or exponent.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    // Rust's Debug gives e.g. "1e-7"/"1e16"; Python writes "1e-07"/"1e+16".
    if let Some((mant, exp)) = s.split_once('e') {
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        return format!("{mant}e{sign}{digits:0>2}");
    }
    s
}

fn py_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, extra: serde_json::Value) -> Result<String> {
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>"))?;
        t.render(&[ChatMessage::new("user", "  Hi  ")], true, &extra)
    }

    #[test]
    fn unknown_variable_is_a_one_line_error_naming_it() {
        let src = "{% for m in messages %}{{ m.content }}{% endfor %}\n{{ not_a_var }}";
        let e = render(src, serde_json::Value::Null).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Template(_)), "{msg}");
        assert!(msg.contains("not_a_var"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        // Supplying it through `extra` makes the same template render.
        let ok = render(src, serde_json::json!({"not_a_var": "X"})).unwrap();
        assert_eq!(ok, "  Hi  X");
    }

    #[test]
    fn optional_keys_test_false_and_python_methods_work() {
        let src = "{% for m in messages %}{% if m.tool_calls %}T{% endif %}[{{ m.content.strip() }}]\
                   {% if m.role.startswith('us') %}U{% endif %}{% endfor %}{{ bos_token }}{{ eos_token }}\
                   {% if tools is none %}N{% endif %}";
        assert_eq!(
            render(src, serde_json::Value::Null).unwrap(),
            "[Hi]U<s></s>N"
        );
    }

    #[test]
    fn raise_exception_message_is_reported() {
        let e = render(
            "{{ raise_exception('Conversation roles must alternate') }}",
            serde_json::Value::Null,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "chat template: Conversation roles must alternate"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = ChatTemplate::new("ok\n{% if %}", None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("chat template: ") && e.contains("line 2") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn strftime_rejects_unknown_specifiers() {
        // Formats themselves are checked against Python in tokenizer::tests::strftime_matches_python.
        assert!(strftime("%Q", 0).is_err());
        assert!(strftime("100%", 0).is_err());
    }

    #[test]
    fn a_template_that_loops_too_long_is_an_error() {
        let src =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi";
        let e = render(src, serde_json::Value::Null)
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps of work"), "{e}");
    }

    #[test]
    fn extra_must_be_an_object() {
        let e = render("x", serde_json::json!([1])).unwrap_err().to_string();
        assert!(e.contains("JSON object"), "{e}");
    }
}
