//! TEMPORARY (replaced by the tok branch).
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;

pub struct ChatTemplate {
    source: String,
}
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
impl ChatTemplate {
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let t = env.get_template("chat").unwrap();
        t.render(minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => extra.get("bos_token"), eos_token => extra.get("eos_token") })
            .map_err(|e| Error::Template(e.to_string()))
    }
}
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Vec<u32>,
    tmpl: Option<ChatTemplate>,
}
impl Tokenizer {
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&p).map_err(|e| Error::file(&p, e))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let tmpl = cfg
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(|s| ChatTemplate {
                source: s.to_string(),
            });
        let eos = cfg
            .get("eos_token")
            .and_then(|t| t.as_str())
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        Ok(Self { inner, eos, tmpl })
    }
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        use tokenizers::pre_tokenizers::{
            byte_level::ByteLevel, digits::Digits, sequence::Sequence,
        };
        let mut inner =
            tokenizers::Tokenizer::from_gguf(content).map_err(|e| Error::file(path, e))?;
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let eos = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .into_iter()
            .collect();
        let tmpl = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(|s| ChatTemplate { source: s.clone() });
        Ok(Self { inner, eos, tmpl })
    }
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::msg(e))?
            .get_ids()
            .to_vec())
    }
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::msg(e))
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
    pub fn bos_token(&self) -> Option<&str> {
        None
    }
    pub fn eos_token(&self) -> Option<&str> {
        None
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.tmpl.as_ref()
    }
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
