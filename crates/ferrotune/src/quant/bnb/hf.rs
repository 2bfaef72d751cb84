//! The safetensors layout of bitsandbytes checkpoints, as transformers saves and loads them:
//!
//! - 4-bit weight `W` (`Linear4bit`): `W` (uint8 `[ceil(n/2), 1]`, the packed codes),
//!   `W.absmax` (f32 per block; uint8 codes with double quant), `W.quant_map` (f32 x16),
//!   with double quant `W.nested_absmax` (f32) and `W.nested_quant_map` (f32 x256), and
//!   `W.quant_state.bitsandbytes__nf4` / `__fp4`: uint8 bytes of the JSON of the rest
//!   (`QuantState.as_dict(packed=True)`: `quant_type`, `blocksize`, `dtype`, `shape`, and
//!   `nested_blocksize`, `nested_dtype`, `nested_offset`), written by `json.dumps`;
//! - int8 module `M` (`Linear8bitLt`): `M.weight` (int8 `[out, in]`), `M.SCB` (f32 per row),
//!   `M.weight_format` (uint8 scalar 0: row-major);
//! - config.json's `quantization_config` (`BitsAndBytesConfig.to_dict()`).
//!
//! Other tensors (embeddings, norms, the LM head) are stored as they are.
use super::{Absmax, FourBit, FourBitKind, Int8Rows, WeightDtype, DYNAMIC_MAP};
use crate::{Error, Result};
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A tensor to write: dtype, shape, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> Self {
        RawTensor {
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn u8(shape: Vec<usize>, v: Vec<u8>) -> Self {
        RawTensor {
            dtype: Dtype::U8,
            shape,
            data: v,
        }
    }
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The suffix of the tensor holding a 4-bit weight's JSON quant state.
pub fn quant_state_suffix(kind: FourBitKind) -> String {
    format!(".quant_state.bitsandbytes__{}", kind.name())
}

/// Python's `repr(float)` (what `json.dumps` writes for a float): the shortest digits that
/// read back to the same double, in positional notation for exponents -4..15, else as
/// `1.5e-05` / `1e+16`; integral values keep `.0`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: `d.ddde±x`.
    let s = format!("{x:e}");
    let (mant, exp) = s.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// The JSON bnb packs into `quant_state.bitsandbytes__<kind>` (`json.dumps` of
/// `QuantState.as_dict()`'s non-tensor items, in its order).
pub fn quant_state_json(q: &FourBit) -> String {
    let shape: Vec<String> = q.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.kind.name(),
        q.blocksize,
        q.dtype.name(),
        shape.join(", ")
    );
    if let Absmax::Nested {
        offset,
        nested_blocksize,
        ..
    } = &q.absmax
    {
        s.push_str(&format!(
            ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(*offset as f64)
        ));
    }
    s.push('}');
    s
}

/// The tensors of 4-bit weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`).
pub fn four_bit_tensors(name: &str, q: &FourBit) -> Vec<(String, RawTensor)> {
    let mut out = vec![
        (
            name.to_string(),
            RawTensor::u8(vec![q.packed.len(), 1], q.packed.clone()),
        ),
        (
            format!("{name}.quant_map"),
            RawTensor::f32(vec![16], q.kind.code()),
        ),
    ];
    match &q.absmax {
        Absmax::Plain(a) => out.push((format!("{name}.absmax"), RawTensor::f32(vec![a.len()], a))),
        Absmax::Nested {
            codes,
            nested_absmax,
            nested_code,
            ..
        } => {
            out.push((
                format!("{name}.absmax"),
                RawTensor::u8(vec![codes.len()], codes.clone()),
            ));
            out.push((
                format!("{name}.nested_absmax"),
                RawTensor::f32(vec![nested_absmax.len()], nested_absmax),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                RawTensor::f32(vec![nested_code.len()], nested_code),
            ));
        }
    }
    let json = quant_state_json(q).into_bytes();
    out.push((
        format!("{name}{}", quant_state_suffix(q.kind)),
        RawTensor::u8(vec![json.len()], json),
    ));
    out
}

/// The tensors of int8 module `module` (e.g. `model.layers.0.mlp.up_proj`).
pub fn int8_tensors(module: &str, q: &Int8Rows) -> Vec<(String, RawTensor)> {
    vec![
        (
            format!("{module}.weight"),
            RawTensor {
                dtype: Dtype::I8,
                shape: vec![q.rows, q.cols],
                data: q.data.iter().map(|&v| v as u8).collect(),
            },
        ),
        (
            format!("{module}.SCB"),
            RawTensor::f32(vec![q.rows], &q.scb),
        ),
        (
            format!("{module}.weight_format"),
            RawTensor::u8(vec![], vec![0]),
        ),
    ]
}

/// Read access to stored tensors by name: dtype, shape, bytes.
pub trait TensorBytes {
    fn tensor_bytes(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])>;
}

impl TensorBytes for candle_core::safetensors::MmapedSafetensors {
    fn tensor_bytes(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        let v = self.get(name).ok()?;
        Some((v.dtype(), v.shape().to_vec(), v.data()))
    }
}

impl TensorBytes for safetensors::SafeTensors<'_> {
    fn tensor_bytes(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        let v = self.tensor(name).ok()?;
        Some((v.dtype(), v.shape().to_vec(), v.data()))
    }
}

impl TensorBytes for BTreeMap<String, RawTensor> {
    fn tensor_bytes(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        self.get(name)
            .map(|t| (t.dtype, t.shape.clone(), t.data.as_slice()))
    }
}

fn get<'a>(
    st: &'a dyn TensorBytes,
    name: &str,
    dtype: Dtype,
    what: &str,
) -> std::result::Result<(Vec<usize>, &'a [u8]), String> {
    let (d, shape, bytes) = st
        .tensor_bytes(name)
        .ok_or_else(|| format!("{what}: tensor `{name}` is missing"))?;
    if d != dtype {
        return Err(format!("tensor `{name}` is {d:?}, expected {dtype:?}"));
    }
    Ok((shape, bytes))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The parsed `quant_state.bitsandbytes__*` JSON of weight `name`.
fn read_quant_state(
    st: &dyn TensorBytes,
    name: &str,
) -> std::result::Result<(FourBitKind, serde_json::Value), String> {
    for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
        let key = format!("{name}{}", quant_state_suffix(kind));
        if let Some((d, _, bytes)) = st.tensor_bytes(&key) {
            if d != Dtype::U8 {
                return Err(format!("tensor `{key}` is {d:?}, expected U8 (JSON bytes)"));
            }
            let v: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("tensor `{key}`: not a bitsandbytes quant state ({e})"))?;
            let qt = v.get("quant_type").and_then(|q| q.as_str());
            if qt != Some(kind.name()) {
                return Err(format!(
                    "tensor `{key}`: quant_type {qt:?} does not match the key's `{}`",
                    kind.name()
                ));
            }
            return Ok((kind, v));
        }
    }
    Err(format!(
        "no `{name}.quant_state.bitsandbytes__nf4` or `__fp4` tensor"
    ))
}

/// Largest tensor a quant state may describe (2^40 values): sizes are checked before anything
/// is allocated.
const MAX_NUMEL: usize = 1 << 40;

fn json_usize(v: &serde_json::Value, key: &str, at: &str) -> std::result::Result<usize, String> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| format!("{at}: key `{key}` is missing or not a non-negative integer"))
}

/// The logical shape a 4-bit weight's quant state declares.
fn quant_state_shape(v: &serde_json::Value, at: &str) -> std::result::Result<Vec<usize>, String> {
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("{at}: key `shape` is missing or not a list"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{at}: key `shape` holds a non-integer"))?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n > 0 && n <= MAX_NUMEL)
        .ok_or_else(|| format!("{at}: key `shape` {shape:?} is empty or too large"))?;
    let _ = n;
    Ok(shape)
}

/// Read 4-bit weight `name` from its tensors, every size checked.
pub fn read_four_bit(st: &dyn TensorBytes, name: &str) -> std::result::Result<FourBit, String> {
    let (kind, qs) = read_quant_state(st, name)?;
    let at = format!("`{name}{}`", quant_state_suffix(kind));
    let shape = quant_state_shape(&qs, &at)?;
    let blocksize = json_usize(&qs, "blocksize", &at)?;
    let dtype_name = qs.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
    let dtype = WeightDtype::parse(dtype_name).ok_or_else(|| {
        format!("{at}: key `dtype` is {dtype_name:?}, expected float32, bfloat16 or float16")
    })?;
    let (_, packed) = get(st, name, Dtype::U8, name)?;
    let absmax_name = format!("{name}.absmax");
    let (ad, _, ab) = st
        .tensor_bytes(&absmax_name)
        .ok_or_else(|| format!("tensor `{absmax_name}` is missing"))?;
    let nested = qs.get("nested_offset").is_some()
        || st.tensor_bytes(&format!("{name}.nested_absmax")).is_some();
    let absmax = if nested {
        if ad != Dtype::U8 {
            return Err(format!(
                "tensor `{absmax_name}` is {ad:?}; with double quant it holds U8 codes"
            ));
        }
        let offset = qs
            .get("nested_offset")
            .and_then(|o| o.as_f64())
            .ok_or_else(|| format!("{at}: key `nested_offset` is missing or not a number"))?;
        let nested_blocksize = json_usize(&qs, "nested_blocksize", &at)?;
        let nd = qs.get("nested_dtype").and_then(|d| d.as_str());
        if nd != Some("float32") {
            return Err(format!(
                "{at}: key `nested_dtype` is {nd:?}, expected \"float32\""
            ));
        }
        let (_, na) = get(st, &format!("{name}.nested_absmax"), Dtype::F32, name)?;
        let (_, nq) = get(st, &format!("{name}.nested_quant_map"), Dtype::F32, name)?;
        Absmax::Nested {
            codes: ab.to_vec(),
            offset: offset as f32,
            nested_absmax: f32s(na),
            nested_blocksize,
            nested_code: f32s(nq),
        }
    } else {
        if ad != Dtype::F32 {
            return Err(format!("tensor `{absmax_name}` is {ad:?}, expected F32"));
        }
        Absmax::Plain(f32s(ab))
    };
    let q = FourBit {
        kind,
        shape,
        dtype,
        blocksize,
        packed: packed.to_vec(),
        absmax,
    };
    q.validate()
        .map_err(|e| format!("4-bit weight `{name}`: {e}"))?;
    // a checkpoint's absmax values come from real weights: a NaN/Inf one only turns outputs
    // into NaN (checked after double quantization is undone, on what the kernels use)
    if let Some((i, v)) = q
        .absmax_f32()
        .into_iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        return Err(format!("4-bit weight `{name}`: absmax of block {i} is {v}"));
    }
    Ok(q)
}

/// Read int8 module `module` (`module.weight` int8 and `module.SCB`).
pub fn read_int8(st: &dyn TensorBytes, module: &str) -> std::result::Result<Int8Rows, String> {
    let wname = format!("{module}.weight");
    let (shape, data) = get(st, &wname, Dtype::I8, module)?;
    if shape.len() != 2 {
        return Err(format!(
            "tensor `{wname}`: shape {shape:?}, expected [out, in]"
        ));
    }
    let (_, scb) = get(st, &format!("{module}.SCB"), Dtype::F32, module)?;
    if let Some((d, _, b)) = st.tensor_bytes(&format!("{module}.weight_format")) {
        if d != Dtype::U8 || b != [0] {
            return Err(format!(
                "tensor `{module}.weight_format`: only 0 (row-major) is supported"
            ));
        }
    }
    let q = Int8Rows {
        rows: shape[0],
        cols: shape[1],
        data: data.iter().map(|&b| b as i8).collect(),
        scb: f32s(scb),
    };
    q.validate()
        .map_err(|e| format!("int8 weight `{wname}`: {e}"))?;
    // a checkpoint's scales come from real weights: a NaN/Inf one only turns outputs into NaN
    if let Some(i) = q.scb.iter().position(|v| !v.is_finite()) {
        return Err(format!("int8 weight `{wname}`: SCB[{i}] is {}", q.scb[i]));
    }
    Ok(q)
}

/// What bnb turned one weight into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    FourBit,
    Int8,
}

/// The bnb-quantized weights of an HF folder, by weight name, for the loader: it reads them
/// and dequantizes to f32 ([`BnbIndex::load`]).
#[derive(Debug, Default)]
pub struct BnbIndex {
    entries: HashMap<String, Entry>,
}

/// config.json's `quantization_config` if it says bitsandbytes.
pub fn bnb_quantization_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None); // the config reader names the error
    };
    match v.get("quantization_config") {
        Some(q) if q.get("quant_method").and_then(|m| m.as_str()) == Some("bitsandbytes") => {
            Ok(Some(q.clone()))
        }
        _ => Ok(None),
    }
}

impl BnbIndex {
    /// Find the quantized weights among `names` (tensor name -> (file, stored shape)): their
    /// entries get the logical shape, and the auxiliary tensors leave the listing.
    pub fn build(
        dir: &Path,
        names: &mut HashMap<String, (PathBuf, Vec<usize>)>,
        st: &dyn TensorBytes,
    ) -> Result<BnbIndex> {
        let mut entries = HashMap::new();
        let keys: Vec<String> = names.keys().cloned().collect();
        let file_of = |names: &HashMap<String, (PathBuf, Vec<usize>)>, k: &str| {
            names
                .get(k)
                .map(|(f, _)| f.clone())
                .unwrap_or_else(|| dir.to_path_buf())
        };
        for k in &keys {
            for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
                if let Some(w) = k.strip_suffix(&quant_state_suffix(kind)) {
                    let (_, qs) =
                        read_quant_state(st, w).map_err(|e| Error::file(file_of(names, k), e))?;
                    let shape = quant_state_shape(&qs, &format!("`{k}`"))
                        .map_err(|e| Error::file(file_of(names, k), e))?;
                    match names.get_mut(w) {
                        Some(e) => e.1 = shape,
                        None => {
                            return Err(Error::file(
                                file_of(names, k),
                                format!("`{k}` has no packed weight `{w}`"),
                            ))
                        }
                    }
                    entries.insert(w.to_string(), Entry::FourBit);
                }
            }
            if let Some(m) = k.strip_suffix(".SCB") {
                let w = format!("{m}.weight");
                if !names.contains_key(&w) {
                    return Err(Error::file(
                        file_of(names, k),
                        format!("`{k}` has no int8 weight `{w}`"),
                    ));
                }
                entries.insert(w, Entry::Int8);
            }
        }
        for (w, e) in &entries {
            let aux: &[&str] = match e {
                Entry::FourBit => &[
                    ".absmax",
                    ".quant_map",
                    ".nested_absmax",
                    ".nested_quant_map",
                    ".quant_state.bitsandbytes__nf4",
                    ".quant_state.bitsandbytes__fp4",
                ],
                Entry::Int8 => &[],
            };
            for s in aux {
                names.remove(&format!("{w}{s}"));
            }
            if *e == Entry::Int8 {
                let m = w.strip_suffix(".weight").unwrap_or(w);
                names.remove(&format!("{m}.SCB"));
                names.remove(&format!("{m}.weight_format"));
            }
        }
        Ok(BnbIndex { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Weight `name` as bnb stored it; `None` when `name` is not a bnb-quantized weight.
    pub fn stored(
        &self,
        name: &str,
        st: &dyn TensorBytes,
    ) -> std::result::Result<Option<BnbWeight>, String> {
        match self.entries.get(name) {
            None => Ok(None),
            Some(Entry::FourBit) => Ok(Some(BnbWeight::FourBit(read_four_bit(st, name)?))),
            Some(Entry::Int8) => {
                let m = name.strip_suffix(".weight").unwrap_or(name);
                Ok(Some(BnbWeight::Int8(read_int8(st, m)?)))
            }
        }
    }

    /// Weight `name` dequantized to f32 as bnb dequantizes it, with its logical shape; `None`
    /// when `name` is not a bnb-quantized weight.
    pub fn load(
        &self,
        name: &str,
        st: &dyn TensorBytes,
    ) -> std::result::Result<Option<Dequantized>, String> {
        match self.entries.get(name) {
            None => Ok(None),
            Some(Entry::FourBit) => {
                let q = read_four_bit(st, name)?;
                Ok(Some((q.dequantize(), q.shape.clone())))
            }
            Some(Entry::Int8) => {
                let m = name.strip_suffix(".weight").unwrap_or(name);
                let q = read_int8(st, m)?;
                Ok(Some((q.dequantize(), vec![q.rows, q.cols])))
            }
        }
    }
}

/// Dequantized values and their shape.
pub type Dequantized = (Vec<f32>, Vec<usize>);

/// The format `ferrotune quantize` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnbFormat {
    FourBit(FourBitKind),
    Int8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnbSpec {
    pub format: BnbFormat,
    /// Double quant of the absmaxes (4-bit only).
    pub double_quant: bool,
    /// 4-bit block size (transformers: 64).
    pub blocksize: usize,
}

/// `BitsAndBytesConfig(...).to_dict()` as transformers writes it into config.json.
pub fn quantization_config(spec: &BnbSpec) -> serde_json::Value {
    let (four, kind, dq) = match spec.format {
        BnbFormat::FourBit(k) => (true, k.name(), spec.double_quant),
        BnbFormat::Int8 => (false, "fp4", false),
    };
    serde_json::json!({
        "_load_in_4bit": four,
        "_load_in_8bit": !four,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": !four,
        "quant_method": "bitsandbytes",
    })
}

/// The tensors of a quantized checkpoint: each weight of `targets` (linear module names)
/// quantized per `spec`, every other tensor stored as f32. `tensors` holds (name, shape, f32
/// values); `dtype` is the weights' own dtype (the values are in it already), recorded in the
/// quant states.
pub fn quantize_tensors(
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    targets: &std::collections::HashSet<String>,
    spec: &BnbSpec,
    dtype: WeightDtype,
) -> Result<BTreeMap<String, RawTensor>> {
    let mut out = BTreeMap::new();
    for (name, shape, values) in tensors {
        let module = name.strip_suffix(".weight");
        let quantize = module.is_some_and(|m| targets.contains(m)) && shape.len() == 2;
        if !quantize {
            out.insert(name, RawTensor::f32(shape, &values));
            continue;
        }
        let module = module.unwrap_or_default();
        crate::quant::check_finite(&values, shape[1])
            .map_err(|e| Error::msg(format!("{name}: {e}")))?;
        let pieces = match spec.format {
            BnbFormat::FourBit(kind) => {
                let mut q =
                    super::quantize_4bit(&values, &shape, kind, spec.blocksize, spec.double_quant)
                        .map_err(|e| Error::msg(format!("{name}: {e}")))?;
                q.dtype = dtype;
                four_bit_tensors(&name, &q)
            }
            BnbFormat::Int8 => {
                let q = super::quantize_int8(&values, shape[0], shape[1])
                    .map_err(|e| Error::msg(format!("{name}: {e}")))?;
                int8_tensors(module, &q)
            }
        };
        out.extend(pieces);
    }
    Ok(out)
}

/// Write `tensors` as a safetensors file (metadata `{"format": "pt"}`, as transformers),
/// atomically.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, RawTensor>) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::file(path, format!("cannot serialize: {e}")))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// The linear modules transformers' bnb integration quantizes: every linear but the output
/// layer and weights tied to an embedding.
pub fn quantize_targets(model: &dyn crate::model::Model) -> std::collections::HashSet<String> {
    let out_layer = model.output_layer();
    model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .filter(|n| Some(n.as_str()) != out_layer && !model.tied(n))
        .collect()
}

/// Write `lm` as a bitsandbytes-quantized HF folder (config.json with its
/// `quantization_config`, model.safetensors in bnb's layout, the tokenizer files and the
/// generation config) that transformers loads with `from_pretrained`.
pub fn write_hf_folder(lm: &crate::model::LoadedModel, dir: &Path, spec: &BnbSpec) -> Result<()> {
    let model = &*lm.model;
    let mut cfg = model.hf_config()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let sd = model.state_dict(candle_core::DType::F32)?;
    let mut tensors = Vec::with_capacity(sd.len());
    for (name, t) in sd {
        let shape = t.dims().to_vec();
        let v = t
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        tensors.push((name, shape, v));
    }
    let targets = quantize_targets(model);
    let out = quantize_tensors(tensors, &targets, spec, WeightDtype::F32)?;
    write_safetensors(&dir.join("model.safetensors"), &out)?;
    cfg["torch_dtype"] = "float32".into();
    cfg["quantization_config"] = quantization_config(spec);
    let text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::msg(format!("cannot serialize config.json: {e}")))?;
    crate::fsutil::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    crate::model::convert::write_folder_extras(model, &lm.tokenizer, dir, &cfg)
}

/// Every quantized weight of a folder's tensors, read back: for tests and `inspect`.
pub fn read_all(
    st: &dyn TensorBytes,
    names: &[String],
) -> std::result::Result<Vec<(String, BnbWeight)>, String> {
    let mut out = Vec::new();
    for n in names {
        for kind in [FourBitKind::Nf4, FourBitKind::Fp4] {
            if let Some(w) = n.strip_suffix(&quant_state_suffix(kind)) {
                out.push((w.to_string(), BnbWeight::FourBit(read_four_bit(st, w)?)));
            }
        }
        if let Some(m) = n.strip_suffix(".SCB") {
            out.push((format!("{m}.weight"), BnbWeight::Int8(read_int8(st, m)?)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// One weight as bnb stored it.
#[derive(Debug, Clone, PartialEq)]
pub enum BnbWeight {
    FourBit(FourBit),
    Int8(Int8Rows),
}

/// bnb's dynamic map, as a nested quant map must hold it (for checks).
pub fn dynamic_map() -> &'static [f32; 256] {
    &DYNAMIC_MAP
}
