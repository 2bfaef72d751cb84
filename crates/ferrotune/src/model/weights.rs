//! Where weights come from. Model code asks for tensors by their Hugging Face names; a source
//! maps them to its own storage (safetensors files, GGUF tensors) and decides the in-memory form.
use crate::nn::{EmbeddingWeight, LinearWeight};
use crate::quant::QuantWeight;
use crate::{Error, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How weights are held in memory once loaded.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Convert dense weights to this dtype (None: keep the stored dtype).
    pub dtype: Option<DType>,
    /// Dequantize quantized weights to dense (`dtype`, default f32) instead of keeping them quantized.
    pub dequantize: bool,
    /// Re-quantize quantized weights to this GGML type at load (e.g. Q8_0 for faster kernels).
    pub requantize: Option<GgmlDType>,
}

pub trait WeightSource {
    fn device(&self) -> &Device;
    /// Name of the file or folder, for messages.
    fn source_name(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    /// A dense tensor (norms, biases) as stored.
    fn dense(&self, name: &str) -> Result<Tensor>;
    fn linear_weight(&self, name: &str) -> Result<LinearWeight>;
    fn embedding_weight(&self, name: &str) -> Result<EmbeddingWeight>;
}

fn convert_dense(t: Tensor, opts: &LoadOptions) -> Result<Tensor> {
    Ok(match opts.dtype {
        Some(dt) if dt != t.dtype() => t.to_dtype(dt)?,
        _ => t,
    })
}

// ---------------------------------------------------------------- safetensors (HF folder)

/// An HF model folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
pub struct SafetensorsSource {
    dir: PathBuf,
    st: candle_core::safetensors::MmapedSafetensors,
    names: HashMap<String, PathBuf>,
    opts: LoadOptions,
    device: Device,
    loaded: RefCell<HashMap<String, Tensor>>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::key(
                        index.display().to_string(),
                        "weight_map",
                        "missing or not an object",
                    )
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::file(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this folder",
                ));
            }
            vec![single]
        };
        let mut names = HashMap::new();
        for f in &files {
            if !f.exists() {
                return Err(Error::file(
                    f,
                    "shard listed in model.safetensors.index.json is missing",
                ));
            }
            // Validate the header and every tensor's byte range before use: a truncated or corrupt
            // file must be a clear error, not a crash deep inside a matmul.
            let file = std::fs::File::open(f).map_err(|e| Error::file(f, e))?;
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(f, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::file(f, format!("not a valid safetensors file: {e}")))?;
            for n in st.names() {
                names.insert(n.to_string(), f.clone());
            }
        }
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::file(dir, crate::error::first_line(&e.to_string())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            st,
            names,
            opts: opts.clone(),
            device: device.clone(),
            loaded: RefCell::new(HashMap::new()),
        })
    }

    fn raw(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.loaded.borrow().get(name) {
            return Ok(t.clone());
        }
        let file = self.names.get(name).ok_or_else(|| {
            Error::file(
                &self.dir,
                format!("tensor `{name}` not found in the safetensors files"),
            )
        })?;
        let t = self.st.load(name, &self.device).map_err(|e| {
            Error::file(
                file,
                format!(
                    "tensor `{name}`: {}",
                    crate::error::first_line(&e.to_string())
                ),
            )
        })?;
        let t = convert_dense(t, &self.opts)?;
        self.loaded.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl WeightSource for SafetensorsSource {
    fn device(&self) -> &Device {
        &self.device
    }
    fn source_name(&self) -> String {
        self.dir.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
    fn dense(&self, name: &str) -> Result<Tensor> {
        self.raw(name)
    }
    fn linear_weight(&self, name: &str) -> Result<LinearWeight> {
        let t = self.raw(name)?;
        if let Some(q) = self.opts.requantize {
            return Ok(LinearWeight::Quantized(Arc::new(QuantWeight::quantize(
                &t.to_dtype(DType::F32)?,
                q,
            )?)));
        }
        Ok(LinearWeight::Frozen(t))
    }
    fn embedding_weight(&self, name: &str) -> Result<EmbeddingWeight> {
        Ok(EmbeddingWeight::Frozen(self.raw(name)?))
    }
}

// ---------------------------------------------------------------- GGUF

/// A GGUF file. Tensors are renamed from llama.cpp's scheme to HF names, and the q/k rows that
/// llama.cpp's converter permuted (for its interleaved RoPE) are put back in HF order, so one
/// model implementation serves both formats and adapters use HF's layout.
pub struct GgufSource {
    path: PathBuf,
    content: gguf_file::Content,
    file: RefCell<std::fs::File>,
    /// llama.cpp permutes q/k only for the "llama" architecture.
    permute_qk: Option<(usize, usize)>,
    opts: LoadOptions,
    device: Device,
    loaded: RefCell<HashMap<String, LinearWeight>>,
}

/// HF tensor name -> GGUF tensor name.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    let g = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (i, module) = rest.split_once('.')?;
            let m = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{i}.{m}")
        }
    };
    Some(format!("{g}.{suffix}"))
}

/// Row permutation that undoes llama.cpp's `permute(w, n_head)` on q/k weights:
/// HF row (h, half, i) sits at GGUF row (h, i, half).
pub fn unpermute_rows(n_rows: usize, n_head: usize) -> Vec<usize> {
    let hd = n_rows / n_head;
    let mut perm = vec![0; n_rows];
    for h in 0..n_head {
        for half in 0..2 {
            for i in 0..hd / 2 {
                perm[h * hd + half * (hd / 2) + i] = h * hd + 2 * i + half;
            }
        }
    }
    perm
}

impl GgufSource {
    pub fn open(
        path: &Path,
        content: gguf_file::Content,
        permute_qk: Option<(usize, usize)>,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let len = file.metadata().map_err(|e| Error::file(path, e))?.len();
        // Check every tensor's byte range up front: a truncated download must fail here with
        // the tensor's name rather than later with a short read.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(Error::file(path, format!("tensor `{name}`: {elems} elements is not a multiple of the block size {bs}")));
            }
            let bytes = (elems / bs * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(Error::file(
                    path,
                    format!(
                        "truncated: tensor `{name}` needs bytes up to {end} but the file has {len}"
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file: RefCell::new(file),
            permute_qk,
            opts: opts.clone(),
            device: device.clone(),
            loaded: RefCell::new(HashMap::new()),
        })
    }

    fn qtensor(&self, hf_name: &str) -> Result<QTensor> {
        let g = gguf_tensor_name(hf_name).ok_or_else(|| {
            Error::file(&self.path, format!("no GGUF name for tensor `{hf_name}`"))
        })?;
        if !self.content.tensor_infos.contains_key(&g) {
            return Err(Error::file(
                &self.path,
                format!("tensor `{g}` ({hf_name}) not found"),
            ));
        }
        let q = self
            .content
            .tensor(&mut *self.file.borrow_mut(), &g, &Device::Cpu)
            .map_err(|e| {
                Error::file(
                    &self.path,
                    format!("tensor `{g}`: {}", crate::error::first_line(&e.to_string())),
                )
            })?;
        Ok(q)
    }

    fn qk_heads(&self, hf_name: &str) -> Option<usize> {
        let (n_head, n_kv) = self.permute_qk?;
        if hf_name.ends_with("self_attn.q_proj.weight")
            || hf_name.ends_with("self_attn.q_proj.bias")
        {
            Some(n_head)
        } else if hf_name.ends_with("self_attn.k_proj.weight")
            || hf_name.ends_with("self_attn.k_proj.bias")
        {
            Some(n_kv)
        } else {
            None
        }
    }

    fn is_float(dt: GgmlDType) -> bool {
        matches!(dt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }

    fn dense_of(&self, q: &QTensor, hf_name: &str) -> Result<Tensor> {
        let stored = match q.dtype() {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(n) = self.qk_heads(hf_name) {
            let perm: Vec<u32> = unpermute_rows(t.dim(0)?, n)
                .into_iter()
                .map(|p| p as u32)
                .collect();
            t = t.index_select(&Tensor::new(perm.as_slice(), &Device::Cpu)?, 0)?;
        }
        let target = self.opts.dtype.unwrap_or(stored);
        Ok(t.to_dtype(target)?.to_device(&self.device)?)
    }
}

impl WeightSource for GgufSource {
    fn device(&self) -> &Device {
        &self.device
    }
    fn source_name(&self) -> String {
        self.path.display().to_string()
    }
    fn contains(&self, name: &str) -> bool {
        gguf_tensor_name(name)
            .map(|g| self.content.tensor_infos.contains_key(&g))
            .unwrap_or(false)
    }
    fn dense(&self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        self.dense_of(&q, name)
    }
    fn linear_weight(&self, name: &str) -> Result<LinearWeight> {
        // Cached so a tied LM head shares the embedding's storage.
        if let Some(w) = self.loaded.borrow().get(name) {
            return Ok(w.clone());
        }
        let q = self.qtensor(name)?;
        let w = if Self::is_float(q.dtype()) || self.opts.dequantize || !self.device.is_cpu() {
            LinearWeight::Frozen(self.dense_of(&q, name)?)
        } else {
            let qw = match self.opts.requantize {
                Some(target) if target != q.dtype() => {
                    QuantWeight::quantize(&q.dequantize(&Device::Cpu)?, target)?
                }
                _ => QuantWeight::from_qtensor(q)?,
            };
            let qw = match self.qk_heads(name) {
                Some(n) => qw.permute_rows(&unpermute_rows(qw.shape().0, n))?,
                None => qw,
            };
            LinearWeight::Quantized(Arc::new(qw))
        };
        self.loaded.borrow_mut().insert(name.to_string(), w.clone());
        Ok(w)
    }
    fn embedding_weight(&self, name: &str) -> Result<EmbeddingWeight> {
        match self.linear_weight(name)? {
            LinearWeight::Quantized(q) => Ok(EmbeddingWeight::Quantized(q)),
            LinearWeight::Frozen(t) => Ok(EmbeddingWeight::Frozen(t)),
            LinearWeight::Trainable(v) => Ok(EmbeddingWeight::Trainable(v)),
        }
    }
}
