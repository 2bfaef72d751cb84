//! Where weights come from. Model code asks for tensors by their Hugging Face names; a source
//! maps them to its own storage (safetensors files, GGUF tensors) and decides the in-memory form.
use crate::nn::{EmbeddingWeight, LinearWeight};
use crate::quant::QuantWeight;
use crate::{Error, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
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
    /// Quantize the linear weights of the decoder layers at load (`train.base_quant`: QLoRA's
    /// NF4 and the other formats of [`crate::quant::BaseQuant`]); embeddings and the LM head
    /// stay as they are, as transformers' bitsandbytes integration leaves them. Weights whose
    /// rows are not whole blocks stay dense.
    pub base_quant: Option<crate::quant::BaseQuant>,
    /// The head to put on a family that has several (BERT): `None` loads the one the folder was
    /// saved with.
    pub head: Option<HeadSpec>,
    /// Dense weights of a safetensors folder that load as placeholders of their shape and
    /// dtype holding no data (one broadcast element): ZeRO-3's frozen weights that another rank
    /// owns, gathered from their owner before each use, so that no rank reads the whole model.
    pub placeholders: Option<Arc<std::collections::HashSet<String>>>,
}

impl LoadOptions {
    /// Whether `name` is one of [`Self::placeholders`].
    pub fn is_placeholder(&self, name: &str) -> bool {
        self.placeholders.as_ref().is_some_and(|p| p.contains(name))
    }

    /// A placeholder of `shape` and `dtype` on `device`: one broadcast value, no data.
    fn placeholder_tensor(dtype: DType, shape: Vec<usize>, device: &Device) -> Result<Tensor> {
        Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape)?)
    }
}

/// A head asked for by a run or a command, rather than the one a folder was saved with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSpec {
    pub head: HeadKind,
    /// The class names (classification heads): the classifier gets one output per name and the
    /// model's `id2label` these names. `None`: the file's.
    pub labels: Option<Vec<String>>,
    /// Head layers the file lacks (a classifier on a bare encoder) are initialised from this
    /// seed, as transformers initialises them; `None`: they must be in the file.
    pub init_seed: Option<u64>,
}

/// Which head ([`HeadSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// The bare model (hidden states).
    None,
    SequenceClassification,
    TokenClassification,
    MaskedLm,
}

pub trait WeightSource {
    fn device(&self) -> &Device;
    /// Name of the file or folder, for messages.
    fn source_name(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    /// The stored shape of tensor `name` (HF name), read from the file's header without loading
    /// the data; None when the source does not have it.
    fn tensor_shape(&self, name: &str) -> Option<Vec<usize>>;
    /// How the file names tensor `name`, for messages (a GGUF says `blk.0.attn_q.weight`).
    fn tensor_label(&self, name: &str) -> String {
        name.to_string()
    }
    /// One more than the highest decoder layer index any tensor belongs to (0: none).
    fn layers_present(&self) -> usize;
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
    /// Tensor name -> (shard, stored shape).
    names: HashMap<String, (PathBuf, Vec<usize>)>,
    opts: LoadOptions,
    device: Device,
    loaded: RefCell<HashMap<String, Tensor>>,
    /// A bitsandbytes checkpoint's quantized weights (dequantized to f32 when read).
    bnb: crate::quant::bnb::hf::BnbIndex,
}

impl SafetensorsSource {
    pub fn open(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = crate::fsutil::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
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
                .iter()
                .map(|(tensor, f)| {
                    let f = f.as_str().ok_or_else(|| {
                        Error::key(
                            index.display().to_string(),
                            format!("weight_map.{tensor}"),
                            "expected a file name",
                        )
                    })?;
                    file_inside(dir, f, &index)
                })
                .collect::<Result<_>>()?;
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
            let file = crate::fsutil::open_regular(f)?;
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(f, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                let why = diagnose_safetensors(&mmap).unwrap_or_else(|| e.to_string());
                Error::file(f, format!("not a valid safetensors file: {why}"))
            })?;
            for (n, view) in st.tensors() {
                names.insert(n, (f.clone(), view.shape().to_vec()));
            }
        }
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::file(dir, crate::error::first_line(&e.to_string())))?;
        let bnb = match crate::quant::bnb::hf::bnb_quantization_config(dir)? {
            Some(_) => crate::quant::bnb::hf::BnbIndex::build(dir, &mut names, &st)?,
            None => Default::default(),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            st,
            names,
            opts: opts.clone(),
            device: device.clone(),
            loaded: RefCell::new(HashMap::new()),
            bnb,
        })
    }

    /// Bytes of the folder's safetensors files (what reading every weight maps in).
    pub fn file_bytes(&self) -> u64 {
        let mut files: Vec<&PathBuf> = self.names.values().map(|(f, _)| f).collect();
        files.sort();
        files.dedup();
        files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    fn raw(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.loaded.borrow().get(name) {
            return Ok(t.clone());
        }
        if let Some(t) = self.placeholder(name)? {
            return Ok(t);
        }
        let (file, _) = self.names.get(name).ok_or_else(|| {
            Error::file(
                &self.dir,
                format!("tensor `{name}` not found in the safetensors files"),
            )
        })?;
        if let Some((v, shape)) = self
            .bnb
            .load(name, &self.st)
            .map_err(|e| Error::file(file, e))?
        {
            let t = convert_dense(Tensor::from_vec(v, shape, &self.device)?, &self.opts)?;
            self.loaded.borrow_mut().insert(name.to_string(), t.clone());
            return Ok(t);
        }
        if let Ok(view) = self.st.get(name) {
            use safetensors::Dtype as D;
            if !matches!(view.dtype(), D::F32 | D::F16 | D::BF16 | D::F64) {
                return Err(Error::file(
                    file,
                    format!(
                        "tensor `{name}` is stored as {:?}; model weights must be floating point (F32, F16, BF16)",
                        view.dtype()
                    ),
                ));
            }
        }
        let t = self.load_checked(name, file, &self.device)?;
        let t = convert_dense(t, &self.opts)?;
        self.loaded.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// Refuse a weight that holds NaN or an infinity (a corrupt or broken checkpoint), naming the
/// file, the tensor and the first bad value: it would run, and give numbers that mean nothing
/// (a NaN norm weight gave a perplexity of 1.8e42 with exit status 0). One pass over each
/// weight as it loads, on the CPU; weights loaded straight onto a GPU are not copied back for it.
fn check_finite_tensor(t: &Tensor, file: &Path, name: &str) -> Result<()> {
    if !t.device().is_cpu() || is_placeholder(t) {
        return Ok(());
    }
    use candle_core::{CpuStorage, Storage};
    let first_bad = {
        let (storage, layout) = t.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            // read in place: no copy of the weight
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v
                .get(a..b)
                .and_then(|s| s.iter().position(|x| !x.is_finite())),
            (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => v
                .get(a..b)
                .and_then(|s| s.iter().position(|x| !x.is_finite())),
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => v
                .get(a..b)
                .and_then(|s| s.iter().position(|x| !x.is_finite())),
            _ => {
                drop(storage);
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                v.iter().position(|x| !x.is_finite())
            }
        }
    };
    match first_bad {
        None => Ok(()),
        Some(i) => {
            let row = t.dims().last().copied().unwrap_or(1).max(1);
            Err(Error::file(
                file,
                format!(
                    "tensor `{name}`: the value at row {}, column {} is NaN or infinite; the weights are broken",
                    i / row,
                    i % row
                ),
            ))
        }
    }
}

/// Whether `t` is a placeholder [`LoadOptions::placeholders`] made: a weight's shape over one
/// broadcast value, holding no data of its own.
pub fn is_placeholder(t: &Tensor) -> bool {
    t.rank() > 0 && t.layout().stride().iter().all(|&s| s == 0)
}

impl SafetensorsSource {
    /// Tensor `name` as the folder stores it, as f32 on the CPU, read past the options (no
    /// `base_quant`, no cache); `None` when it is absent or stored in a non-float type (a
    /// bitsandbytes-quantized weight). LoftQ measures a base quantized at load against it.
    pub fn stored_f32(&self, name: &str) -> Result<Option<Tensor>> {
        use safetensors::Dtype as D;
        let Some((file, _)) = self.names.get(name) else {
            return Ok(None);
        };
        match self.st.get(name) {
            Ok(v) if matches!(v.dtype(), D::F32 | D::F16 | D::BF16 | D::F64) => {}
            _ => return Ok(None),
        }
        let t = self.load_checked(name, file, &Device::Cpu)?;
        Ok(Some(t.to_dtype(DType::F32)?))
    }

    /// Tensor `name` of shard `file` onto `device` as stored, checked finite; errors name both.
    fn load_checked(&self, name: &str, file: &Path, device: &Device) -> Result<Tensor> {
        let t = self.st.load(name, device).map_err(|e| {
            Error::file(
                file,
                format!(
                    "tensor `{name}`: {}",
                    crate::error::first_line(&e.to_string())
                ),
            )
        })?;
        check_finite_tensor(&t, file, name)?;
        Ok(t)
    }

    /// Whether `name` is one of [`LoadOptions::placeholders`].
    fn is_placeholder(&self, name: &str) -> bool {
        self.opts.is_placeholder(name)
    }

    /// [`LoadOptions::placeholders`]: `name`'s shape and dtype (after `dtype`) with no data, if
    /// the options name it and it is stored as a float (anything else loads as usual).
    fn placeholder(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.is_placeholder(name) {
            return Ok(None);
        }
        let Ok(view) = self.st.get(name) else {
            return Ok(None);
        };
        let stored = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            _ => return Ok(None),
        };
        let dtype = self.opts.dtype.unwrap_or(stored);
        LoadOptions::placeholder_tensor(dtype, view.shape().to_vec(), &self.device).map(Some)
    }

    /// A bitsandbytes-quantized linear of a pre-quantized folder, kept in its format (NF4 / FP4
    /// rows that are whole blocks, int8 rows) for our kernels, unless the options ask for dense
    /// weights (`--dequantize`, another `--base-quant`/`--requantize`, a non-CPU device); None
    /// otherwise, and the weight is read dequantized.
    fn bnb_quantized(&self, name: &str) -> Result<Option<LinearWeight>> {
        use crate::quant::bnb::{hf::BnbWeight, FourBitKind};
        if self.bnb.is_empty()
            || self.opts.dequantize
            || self.opts.requantize.is_some()
            || self.opts.base_quant.is_some()
            || !self.device.is_cpu()
        {
            return Ok(None);
        }
        let file = self
            .names
            .get(name)
            .map(|(f, _)| f.clone())
            .unwrap_or_else(|| self.dir.clone());
        let Some(stored) = self
            .bnb
            .stored(name, &self.st)
            .map_err(|e| Error::file(&file, e))?
        else {
            return Ok(None);
        };
        let q = match stored {
            BnbWeight::FourBit(f) => {
                let [n, k] = f.shape[..] else {
                    return Ok(None);
                };
                // a 16-bit original is dequantized rounded to its dtype (bnb's output): only an
                // f32 one decodes to exactly the kernels' values
                if k % f.blocksize != 0 || f.dtype != crate::quant::bnb::WeightDtype::F32 {
                    return Ok(None);
                }
                let nf4 = f.kind == FourBitKind::Nf4;
                crate::quant::QuantWeight::from_four_bit(
                    n,
                    k,
                    nf4,
                    crate::quant::four_bit_weight(f)?,
                )
                .map_err(|e| Error::file(&file, format!("`{name}`: {e}")))?
            }
            BnbWeight::Int8(w) => crate::quant::QuantWeight::from_int8_rows(
                w.rows,
                w.cols,
                crate::quant::Int8RowsWeight {
                    data: w.data,
                    scb: w.scb,
                },
            )
            .map_err(|e| Error::file(&file, format!("`{name}`: {e}")))?,
        };
        Ok(Some(LinearWeight::Quantized(Arc::new(q))))
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
    fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.names.get(name).map(|(_, shape)| shape.clone())
    }
    fn layers_present(&self) -> usize {
        layers_present(self.names.keys().map(|n| n.strip_prefix("model.layers.")))
    }
    fn dense(&self, name: &str) -> Result<Tensor> {
        self.raw(name)
    }
    fn linear_weight(&self, name: &str) -> Result<LinearWeight> {
        if let Some(w) = self.bnb_quantized(name)? {
            return Ok(w);
        }
        let t = self.raw(name)?;
        if self.is_placeholder(name) {
            // another ZeRO-3 rank's weight: it quantizes its own and sends the blocks
            return Ok(LinearWeight::Frozen(t));
        }
        if let Some(w) = quantize_base(&self.opts, name, &t)? {
            // drop the f32 copy now rather than when loading ends: otherwise the whole model is
            // held in f32 beside its quantized form at the load's peak (28 GB more for a 7B)
            self.loaded.borrow_mut().remove(name);
            return Ok(w);
        }
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

/// Which tensor of a safetensors file the `safetensors` crate refused, and why: it reports
/// "invalid shape, data type, or offset for tensor" without the name. Reads the JSON header
/// and checks each entry's byte range against its shape and dtype and against the entries
/// before it (in offset order). None if nothing specific is found.
fn diagnose_safetensors(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = (bytes.len() - 8 - n) as u64;
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype")?.as_str()?;
        let size: u64 = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
            "U16" | "I16" | "F16" | "BF16" => 2,
            "U32" | "I32" | "F32" => 4,
            "U64" | "I64" | "F64" => 8,
            other => return Some(format!("tensor `{name}`: unknown dtype `{other}`")),
        };
        let shape: Option<Vec<u64>> = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect();
        let Some(shape) = shape else {
            return Some(format!("tensor `{name}`: shape is not a list of sizes"));
        };
        let offs: Option<Vec<u64>> = info
            .get("data_offsets")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect();
        let (begin, end) = match offs.as_deref() {
            Some([b, e]) if b <= e => (*b, *e),
            _ => return Some(format!("tensor `{name}`: data_offsets is not [begin, end]")),
        };
        let want = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX);
        if end - begin != want {
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} takes {want} bytes, but its data_offsets [{begin}, {end}] hold {}",
                end - begin
            ));
        }
        if end > data_len {
            return Some(format!(
                "tensor `{name}`: data_offsets end {end} is past the {data_len} bytes of data (truncated?)"
            ));
        }
        ranges.push((begin, end, name));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].1 != w[1].0 {
            return Some(format!(
                "tensor `{}`: data_offsets begin {} does not follow tensor `{}`, which ends at {}",
                w[1].2, w[1].0, w[0].2, w[0].1
            ));
        }
    }
    None
}

/// `LoadOptions::base_quant` applied to linear weight `name` (None: not asked for, not a
/// decoder-layer linear, or a shape the format cannot hold).
fn quantize_base(opts: &LoadOptions, name: &str, t: &Tensor) -> Result<Option<LinearWeight>> {
    let Some(bq) = opts.base_quant else {
        return Ok(None);
    };
    if !is_base_quant_target(name) || t.rank() != 2 {
        return Ok(None);
    }
    let q = bq
        .quantize(t)
        .map_err(|e| Error::msg(format!("{name}: base_quant {}: {e}", bq.name())))?;
    if q.is_none() {
        // as llama.cpp's quantizer does for a row that is not whole blocks: keep it, and say so
        tracing::warn!(
            "{name}: rows of {} values are not whole {}-value blocks of {}; kept in {:?}, not quantized",
            t.dims().last().copied().unwrap_or(0),
            bq.block_size(),
            bq.name(),
            t.dtype()
        );
    }
    Ok(q.map(|q| LinearWeight::Quantized(Arc::new(q))))
}

/// The linears `base_quant` quantizes: every weight matrix except the embeddings and the LM
/// head (which transformers' `BitsAndBytesConfig` keeps in 16/32-bit by default).
pub fn is_base_quant_target(name: &str) -> bool {
    name.ends_with(".weight")
        && !name.contains("embed")
        && !name.starts_with("lm_head")
        && !name.contains("shared.")
        && !name.contains("classifier")
        && !name.contains("score.")
}

/// One more than the highest layer index among tensor names with their layer prefix stripped
/// (`3.mlp.up_proj.weight` -> 3; None for names outside the layers).
fn layers_present<'a>(rests: impl Iterator<Item = Option<&'a str>>) -> usize {
    rests
        .flatten()
        .filter_map(|rest| rest.split_once('.')?.0.parse::<usize>().ok())
        .map(|i| i.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// A file that another file of a model folder names (a shard in `model.safetensors.index.json`),
/// resolved so that it stays inside the folder `dir`: `name` must be a relative path without
/// `..`, and once symlinks are resolved it must still lie under `dir`, or, when `dir` is a
/// Hugging Face cache snapshot (`.../models--org--name/snapshots/<revision>`), under that
/// repository's `blobs/` folder, where the hub keeps the files a snapshot links to.
/// `named_in` is the file that named it, for the error.
pub fn file_inside(dir: &Path, name: &str, named_in: &Path) -> Result<PathBuf> {
    check_relative_name(name).map_err(|what| Error::file(named_in, what))?;
    let path = dir.join(name);
    // A missing file is reported by the caller; there is no link to follow.
    if let Ok(real) = path.canonicalize() {
        let root = dir.canonicalize().map_err(|e| Error::file(dir, e))?;
        let hub_blobs = root
            .parent()
            .filter(|p| p.file_name() == Some("snapshots".as_ref()))
            .and_then(Path::parent)
            .map(|repo| repo.join("blobs"));
        let inside =
            real.starts_with(&root) || hub_blobs.is_some_and(|blobs| real.starts_with(blobs));
        if !inside {
            return Err(Error::file(
                named_in,
                format!(
                    "`{name}` leads to {}, outside the model folder; refused",
                    real.display()
                ),
            ));
        }
    }
    Ok(path)
}

/// A file name read from inside a model folder or repository: a relative path that cannot climb
/// out of it (no `..`, no root, no drive prefix).
pub fn check_relative_name(name: &str) -> std::result::Result<(), String> {
    let p = Path::new(name);
    let plain = !name.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a relative file name inside the model folder (absolute paths and `..` are refused)"
        ))
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
        // Check every tensor's size and byte range up front, in checked arithmetic (a dimension
        // of 2^62 must not wrap into a small size): a truncated or corrupt file must fail here
        // with the tensor's name rather than later with a short read or an abort on allocation.
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            let bad = |what: String| Error::file(path, format!("tensor `{name}`: {what}"));
            if dims.contains(&0) {
                return Err(bad(format!("shape {dims:?} has a dimension of 0")));
            }
            let elems = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad(format!("shape {dims:?} has more elements than can exist")))?;
            let bs = info.ggml_dtype.block_size();
            // GGML blocks run along a row (the innermost dimension).
            let row = dims.last().copied().unwrap_or(1);
            if !row.is_multiple_of(bs) {
                return Err(bad(format!(
                    "rows of {row} values are not a whole number of {:?} blocks of {bs}",
                    info.ggml_dtype
                )));
            }
            let end = (elems / bs)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|bytes| u64::try_from(bytes).ok())
                .and_then(|bytes| {
                    (content.tensor_data_offset)
                        .checked_add(info.offset)?
                        .checked_add(bytes)
                });
            match end {
                Some(end) if end <= len => {}
                Some(end) => {
                    return Err(Error::file(
                        path,
                        format!(
                        "truncated: tensor `{name}` needs bytes up to {end} but the file has {len}"
                    ),
                    ))
                }
                None => {
                    return Err(bad(format!(
                        "shape {dims:?} at offset {} does not fit in a file of {len} bytes",
                        info.offset
                    )))
                }
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

    /// [`LoadOptions::placeholders`]: `name`'s shape with no data (f32, or the options'
    /// `dtype`), its blocks never read, if the options name it and the file has it.
    fn placeholder(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.opts.is_placeholder(name) {
            return Ok(None);
        }
        let Some(shape) = self.tensor_shape(name) else {
            return Ok(None);
        };
        let dtype = self.opts.dtype.unwrap_or(DType::F32);
        LoadOptions::placeholder_tensor(dtype, shape, &self.device).map(Some)
    }

    fn dense_of(&self, q: &QTensor, hf_name: &str) -> Result<Tensor> {
        let stored = match q.dtype() {
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let mut t = q.dequantize(&Device::Cpu)?;
        let label = gguf_tensor_name(hf_name).unwrap_or_else(|| hf_name.to_string());
        check_finite_tensor(&t, &self.path, &label)?;
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
    fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        let g = gguf_tensor_name(name)?;
        Some(self.content.tensor_infos.get(&g)?.shape.dims().to_vec())
    }
    fn tensor_label(&self, name: &str) -> String {
        gguf_tensor_name(name).unwrap_or_else(|| name.to_string())
    }
    fn layers_present(&self) -> usize {
        layers_present(
            self.content
                .tensor_infos
                .keys()
                .map(|n| n.strip_prefix("blk.")),
        )
    }
    fn dense(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.placeholder(name)? {
            return Ok(t);
        }
        let q = self.qtensor(name)?;
        self.dense_of(&q, name)
    }
    fn linear_weight(&self, name: &str) -> Result<LinearWeight> {
        // Cached so a tied LM head shares the embedding's storage.
        if let Some(w) = self.loaded.borrow().get(name) {
            return Ok(w.clone());
        }
        if let Some(t) = self.placeholder(name)? {
            let w = LinearWeight::Frozen(t);
            self.loaded.borrow_mut().insert(name.to_string(), w.clone());
            return Ok(w);
        }
        let q = self.qtensor(name)?;
        if self.opts.base_quant.is_some() && is_base_quant_target(name) {
            // a GGUF base re-quantized to the asked format: from its f32 values, rows in HF order
            let dense = self.dense_of(&q, name)?;
            if let Some(w) = quantize_base(&self.opts, name, &dense)? {
                self.loaded.borrow_mut().insert(name.to_string(), w.clone());
                return Ok(w);
            }
        }
        // Types without our own kernels (Q5_0, Q5_1, the K-quants) are held dense (f32): the
        // fast engine and the training paths then treat them as any dense weight; Q4_0, Q4_1 and
        // Q8_0 stay quantized on our kernels.
        let own_kernels = matches!(
            q.dtype(),
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0
        );
        let keep_quantized = own_kernels || self.opts.requantize.is_some();
        let w = if Self::is_float(q.dtype())
            || self.opts.dequantize
            || !self.device.is_cpu()
            || !keep_quantized
        {
            LinearWeight::Frozen(self.dense_of(&q, name)?)
        } else {
            let qw = match self.opts.requantize {
                Some(target) if target != q.dtype() => {
                    QuantWeight::quantize(&q.dequantize(&Device::Cpu)?, target)?
                }
                _ => {
                    let g = gguf_tensor_name(name).unwrap_or_else(|| name.to_string());
                    QuantWeight::from_qtensor(q)
                        .map_err(|e| Error::file(&self.path, format!("tensor `{g}`: {e}")))?
                }
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

/// A tensor a config implies: its HF name, its shape, and the config keys (with their values)
/// the shape follows from. Every family checks the weights against these before reading any.
pub(crate) struct ExpectedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub because: Vec<(&'a str, usize)>,
}

impl ExpectedTensor<'_> {
    /// `shape`, found in `source` for this tensor (shown as `label`), is the implied one; else
    /// a one-line error naming the tensor, both shapes, `config_file` and the keys.
    pub(crate) fn check_shape(
        &self,
        source: &str,
        label: &str,
        shape: &[usize],
        config_file: &str,
    ) -> Result<()> {
        if shape == self.shape.as_slice() {
            return Ok(());
        }
        let because: Vec<String> = self
            .because
            .iter()
            .map(|(key, v)| format!("{key} {v}"))
            .collect();
        Err(Error::msg(format!(
            "{source}: tensor `{label}` is {shape:?} but {config_file} ({}) implies {:?}",
            because.join(", "),
            self.shape
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a JSON header and `data` bytes.
    fn st_bytes(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    }

    #[test]
    fn weights_holding_nan_or_infinity_are_refused_by_file_tensor_and_place() {
        // safetensors: a NaN in an f32 tensor, an infinity in an f16 one, a finite neighbour
        let dir = tmp("nonfinite");
        let mut data = Vec::new();
        for v in [1.0f32, 2.0, 3.0, f32::NAN] {
            data.extend(v.to_le_bytes());
        }
        for v in [0.5f32, f32::INFINITY, 1.0, 2.0] {
            data.extend(half::f16::from_f32(v).to_le_bytes());
        }
        for v in [0.25f32, -0.5] {
            data.extend(v.to_le_bytes());
        }
        let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]},"c":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        let e = src.dense("a").unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors")
                && e.contains("tensor `a`")
                && e.contains("row 1, column 1"),
            "{e}"
        );
        let e = src.dense("b").unwrap_err().to_string();
        assert!(
            e.contains("tensor `b`") && e.contains("row 0, column 1"),
            "{e}"
        );
        assert_eq!(
            src.dense("c").unwrap().to_vec1::<f32>().unwrap(),
            [0.25, -0.5]
        );
        std::fs::remove_dir_all(&dir).unwrap();

        // GGML blocks: a Q8_0 weight whose second row's scale is NaN, a Q4_1 one whose `m` is inf
        use candle_core::quantized::QStorage;
        use std::borrow::Cow;
        let w = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        for (dtype, at, bad, want) in [
            (
                GgmlDType::Q8_0,
                34,
                0x7e00u16,
                "block 0 of row 1 has a scale of NaN",
            ),
            (
                GgmlDType::Q4_1,
                2,
                0x7c00u16,
                "block 0 of row 0 has a scale of inf",
            ),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let mut raw = q.data().unwrap().into_owned();
            assert!(QuantWeight::from_qtensor(q).is_ok());
            raw[at..at + 2].copy_from_slice(&bad.to_le_bytes());
            let storage = QStorage::from_data(Cow::Owned(raw), &Device::Cpu, dtype).unwrap();
            let q = QTensor::new(storage, (2, 32)).unwrap();
            let e = QuantWeight::from_qtensor(q).unwrap_err().to_string();
            assert!(e.contains(want), "{dtype:?}: {e}");
        }
    }

    #[test]
    fn a_refused_safetensors_file_is_explained_by_tensor_name() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}}"#;
        assert!(safetensors::SafeTensors::deserialize(&st_bytes(ok, 24)).is_ok());
        assert_eq!(diagnose_safetensors(&st_bytes(ok, 24)), None);
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#,
                16,
                "tensor `a`: shape [2, 3] of F32 takes 24 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[1],"data_offsets":[20,24]}}"#,
                24,
                "tensor `b`: data_offsets begin 20 does not follow tensor `a`",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
                "tensor `a`: data_offsets end 16 is past the 8 bytes",
            ),
        ];
        for (header, data, want) in cases {
            let b = st_bytes(header, data);
            assert!(
                safetensors::SafeTensors::deserialize(&b).is_err(),
                "{header}"
            );
            let got = diagnose_safetensors(&b).unwrap_or_default();
            assert!(got.contains(want), "{header}: {got}");
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ferrotune-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn names_from_a_model_folder_must_stay_inside_it() {
        let root = tmp("inside");
        let dir = root.join("model");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"").unwrap();
        std::fs::write(dir.join("sub/b.safetensors"), b"").unwrap();
        std::fs::write(root.join("outside.safetensors"), b"").unwrap();
        let index = dir.join("model.safetensors.index.json");
        assert_eq!(
            file_inside(&dir, "a.safetensors", &index).unwrap(),
            dir.join("a.safetensors")
        );
        file_inside(&dir, "sub/b.safetensors", &index).unwrap();
        for bad in [
            "../outside.safetensors",
            "sub/../../outside.safetensors",
            "/etc/passwd",
            "",
            ".",
        ] {
            let e = file_inside(&dir, bad, &index).unwrap_err().to_string();
            assert!(
                e.starts_with(&index.display().to_string()) && e.contains(&format!("`{bad}`")),
                "{bad}: {e}"
            );
        }
        // A link inside the folder to a file outside it.
        std::os::unix::fs::symlink(
            root.join("outside.safetensors"),
            dir.join("link.safetensors"),
        )
        .unwrap();
        let e = file_inside(&dir, "link.safetensors", &index)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the model folder"), "{e}");
        // A link that stays inside is fine.
        std::os::unix::fs::symlink(dir.join("a.safetensors"), dir.join("alias.safetensors"))
            .unwrap();
        file_inside(&dir, "alias.safetensors", &index).unwrap();
    }

    #[test]
    fn hub_cache_snapshots_may_link_into_their_blobs() {
        // The layout hf-hub writes: snapshots/<rev>/<file> -> ../../blobs/<hash>.
        let repo = tmp("hub").join("models--org--name");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs/0123"), b"").unwrap();
        std::os::unix::fs::symlink("../../blobs/0123", snap.join("model-1.safetensors")).unwrap();
        let index = snap.join("model.safetensors.index.json");
        file_inside(&snap, "model-1.safetensors", &index).unwrap();
        // ...but not anywhere else outside the snapshot.
        std::fs::write(repo.join("elsewhere"), b"").unwrap();
        std::os::unix::fs::symlink("../../elsewhere", snap.join("model-2.safetensors")).unwrap();
        assert!(file_inside(&snap, "model-2.safetensors", &index).is_err());
        // A folder that is not a snapshot gets no such allowance.
        let plain = repo.join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        std::os::unix::fs::symlink("../blobs/0123", plain.join("m.safetensors")).unwrap();
        assert!(file_inside(&plain, "m.safetensors", &index).is_err());
    }

    #[test]
    fn layers_present_counts_to_the_highest_index() {
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.11.input_layernorm.weight",
            "model.layers.x.bogus",
        ];
        let n = layers_present(names.iter().map(|n| n.strip_prefix("model.layers.")));
        assert_eq!(n, 12);
        assert_eq!(layers_present(["lm_head.weight"].iter().map(|_| None)), 0);
    }
}
