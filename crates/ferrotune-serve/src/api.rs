//! Request bodies of `/v1/completions` and `/v1/chat/completions` (OpenAI's field names), and
//! their checks. Unknown fields are ignored, as OpenAI does; `null` means "not given".
use crate::error::ApiError;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Most choices one request may ask for (`n` × prompts): each is a sequence slot.
pub const MAX_CHOICES: usize = 128;
/// OpenAI's bounds: `top_logprobs` 0..=20 (chat), `logprobs` 0..=5 (completions; we allow 20).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most stop strings per request (OpenAI allows 4; more costs only a little search).
pub const MAX_STOPS: usize = 16;

/// `"stop": "x"` or `"stop": ["x", "y"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// Chat content: a string, or a list of parts of which the `text` ones are read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// `null` for an assistant turn that only called tools.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's tool calls (read only to allow its `content` to be null).
    #[serde(default)]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool message's answer to the call of this id (required, as OpenAI requires it).
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The sampling and limit fields both endpoints share.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not OpenAI's, but vLLM's and llama.cpp's: sample from the k most likely tokens.
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Not OpenAI's, but vLLM's: keep generating past end-of-sequence tokens (benchmarks,
    /// fixed-length outputs).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// OpenAI: token id (as a string) to a bias from -100 to 100 added to its logit.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// OpenAI's end-user id: only its type is checked (a string), as OpenAI checks it.
    #[serde(default)]
    pub user: Option<String>,
}

/// The fields only chat has (read from the same body as [`Common`]).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    /// Chat: whether to return log-probabilities; `top_logprobs` says how many alternatives.
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
}

/// `"prompt"`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// The fields only completions has (read from the same body as [`Common`]).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Completions: an integer, the number of alternatives to report per token.
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<i64>,
}

/// Parse a request body into the shared fields and the endpoint's own. Both are read from
/// one parsed value (rather than with `#[serde(flatten)]`) so that an error names the exact
/// field (`param`).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<(Common, T), ApiError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok((from_value(&v)?, from_value(&v)?))
}

/// Deserialize `T` from a JSON value; a wrong type or a missing field names the field.
pub fn from_value<T: DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let text = data_error_text(e.inner());
        if path != "." {
            return ApiError::field(&path, text);
        }
        match text
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            Some(f) => ApiError::field(f, "missing (required)"),
            None => ApiError::bad_request(format!("the request body: {text}")),
        }
    })
}

/// serde's message, reworded where it is cryptic for an API user.
fn data_error_text(e: &serde_json::Error) -> String {
    let s = e.to_string();
    // The line/column suffix is noise in a one-field message.
    let s = match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    };
    if s.starts_with("data did not match any variant of untagged enum Stop") {
        return "expected a string or a list of strings".into();
    }
    if s.starts_with("data did not match any variant of untagged enum Prompt") {
        return "expected a string, a list of strings, a list of token ids or a list of such lists"
            .into();
    }
    if s.starts_with("data did not match any variant of untagged enum Content") {
        return "expected a string or a list of content parts".into();
    }
    s
}

/// A count field: `None` when absent, else within `lo..=hi`.
pub fn int_in(field: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x < lo || x > hi => Err(ApiError::field(
            field,
            format!("{x} is out of range: expected {lo} to {hi}"),
        )),
        Some(x) => Ok(Some(x as usize)),
    }
}

/// A real-valued field within `lo..=hi` (finite).
pub fn real_in(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(ApiError::field(
            field,
            format!("{x:?} is out of range: expected {lo} to {hi}"),
        )),
        Some(x) => Ok(Some(x)),
    }
}

impl Stop {
    /// The stop strings, checked: at most [`MAX_STOPS`], none empty.
    pub fn strings(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if v.len() > MAX_STOPS {
            return Err(ApiError::field(
                "stop",
                format!("{} stop strings: at most {MAX_STOPS}", v.len()),
            ));
        }
        if v.iter().any(|s| s.is_empty()) {
            return Err(ApiError::field("stop", "a stop string is empty"));
        }
        Ok(v)
    }
}

impl Content {
    /// The text of the message (text parts joined; other parts refused: no image input).
    pub fn text(self, field: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s),
            Content::Parts(parts) => {
                let mut out = String::new();
                for (i, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => out.push_str(&t),
                        ("text", None) => {
                            return Err(ApiError::field(&format!("{field}[{i}].text"), "missing"))
                        }
                        (other, _) => {
                            return Err(ApiError::field(
                                &format!("{field}[{i}].type"),
                                format!(
                                    "`{other}` parts are not supported by this model (text only)"
                                ),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}
