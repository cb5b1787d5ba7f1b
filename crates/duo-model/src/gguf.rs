//! A GGUF reader that trusts nothing in the file.
//!
//! Every count, length and offset is checked against the bytes that remain before
//! anything is allocated, so a truncated, corrupted or hostile file gives a
//! [`ModelError::Malformed`] naming the problem, never a panic or an unbounded
//! allocation. Tensor data is handed to candle's quantised types only after its type,
//! shape and byte range have been validated.

use crate::error::{ModelError, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
/// At most this many dimensions per tensor (ggml's limit).
const MAX_DIMS: usize = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// `f32` or `f64`.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid UTF-8 is replaced).
    String(String),
    /// An array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// As an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Shape, outermost first (GGUF stores innermost first; this is reversed).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: GgmlDType,
    /// Byte offset of the data, absolute in the file.
    pub offset: usize,
    /// Byte length of the data.
    pub size: usize,
}

/// A parsed GGUF file with its bytes.
pub struct GgufFile {
    path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Key/value metadata.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor directory, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: FileBytes,
}

/// A GGUF file's bytes: memory-mapped when opened from disk (tensors are read from the page
/// cache, never copied whole onto the heap), owned when parsed from memory.
enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn bad(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Malformed { path: self.path.to_path_buf(), reason: format!("{} (at byte {})", reason.into(), self.pos) }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.bad(format!("needs {n} more bytes, only {} remain (file truncated?)", self.remaining())));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A count of items each at least `min_size` bytes long: must fit in what remains.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        if n > (self.remaining() / min_size.max(1)) as u64 {
            return Err(self.bad(format!("{what} count {n} cannot fit in the {} bytes that remain", self.remaining())));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U64(self.take(1)?[0] as u64),
            1 => MetaValue::I64(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::U64(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => MetaValue::I64(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::U64(self.u32()? as u64),
            5 => MetaValue::I64(self.u32()? as i32 as i64),
            6 => MetaValue::F64(f32::from_bits(self.u32()?) as f64),
            7 => match self.take(1)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.bad(format!("boolean byte {b}"))),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => return Err(self.bad(format!("unknown array element type {t}"))),
                };
                let n = self.count("array", min)?;
                let mut out = Vec::with_capacity(n.min(1 << 16)); // grows only as elements parse
                for _ in 0..n {
                    out.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(out)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(self.u64()? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.bad(format!("unknown metadata value type {t}"))),
        })
    }
}

/// The ggml type ids duo reads.
fn dtype_from_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Checks that the tensor table describes the data section exactly: every tensor starts at
/// an aligned offset, the first at the section's start and each next one right after the
/// previous one's bytes (as its type and shape give them) plus alignment padding, with at
/// most one alignment unit of padding after the last. A tensor whose type or shape was
/// changed, or whose offset was moved, no longer tiles the section: its bytes would overlap
/// a neighbour's, or leave a gap, and it would load as garbage.
fn check_tiling(tensors: &BTreeMap<String, TensorInfo>, data_start: usize, alignment: usize, file_len: usize) -> std::result::Result<(), String> {
    let mut order: Vec<&TensorInfo> = tensors.values().collect();
    order.sort_by_key(|t| (t.offset, t.name.as_str()));
    let mut expected = data_start;
    let mut previous: Option<&TensorInfo> = None;
    for t in order {
        if !(t.offset - data_start).is_multiple_of(alignment) {
            return Err(format!("tensor `{}` starts at data offset {}, not a multiple of the alignment {alignment}", t.name, t.offset - data_start));
        }
        if t.offset != expected {
            let after = previous.map_or("the start of the data section".to_string(), |p| format!("`{}` ({:?} {:?}, {} bytes)", p.name, p.dtype, p.shape, p.size));
            let how = if t.offset < expected { "overlaps" } else { "leaves a gap after" };
            return Err(format!("tensor `{}` at data offset {} {how} {after}: the tensor table does not match the data (a changed type, shape or offset)", t.name, t.offset - data_start));
        }
        expected = (t.offset + t.size).div_ceil(alignment) * alignment;
        previous = Some(t);
    }
    if let Some(p) = previous {
        let end = p.offset + p.size;
        if file_len > end.div_ceil(alignment) * alignment + alignment {
            return Err(format!("{} bytes follow the last tensor `{}` ({:?} {:?}): the tensor table does not describe them", file_len - end, p.name, p.dtype, p.shape));
        }
    }
    Ok(())
}

impl GgufFile {
    /// Reads and validates a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?.len();
        if len < 1 << 16 {
            // Too small to be worth a map (and an empty file cannot be mapped).
            let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
            return Self::from_bytes(bytes, path);
        }
        Self::parse(FileBytes::Mapped(crate::checkpoint::map_file(path)?), path)
    }

    /// Parses and validates GGUF bytes (`path` is only used in messages).
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        Self::parse(FileBytes::Owned(bytes), path)
    }

    fn parse(bytes: FileBytes, path: &Path) -> Result<Self> {
        let mut r = Reader { bytes: &bytes, pos: 0, path };
        let magic = r.take(4)?;
        if magic != MAGIC {
            return Err(r.bad(format!("bad magic {magic:?}, expected \"GGUF\"")));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("GGUF version {version} is not supported (2 or 3)")));
        }
        // A tensor record is at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = r.count("tensor", 24)?;
        // A metadata record is at least 8 (key length) + 4 (type) + 1 byte.
        let n_kv = r.count("metadata", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.bad(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64()?;
                if d == 0 || d > (1 << 40) {
                    return Err(r.bad(format!("tensor `{name}` has dimension {d}")));
                }
                shape.push(d as usize);
            }
            shape.reverse();
            let ty = r.u32()?;
            let dtype = dtype_from_id(ty).ok_or_else(|| r.bad(format!("tensor `{name}` has unknown or unsupported type {ty}")))?;
            let offset = r.u64()?;
            infos.push((name, shape, dtype, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return Err(r.bad(format!("general.alignment {v:?} is not a power of two"))),
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, dtype, offset) in infos {
            let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| r.bad(format!("tensor `{name}` is too large")))?;
            let block = dtype.block_size();
            if elems % block != 0 || shape.last().is_some_and(|&inner| inner % block != 0) {
                return Err(r.bad(format!("tensor `{name}` of {elems} elements does not divide into {dtype:?} blocks of {block}")));
            }
            let size = elems / block * dtype.type_size();
            let start = (offset as usize).checked_add(data_start).filter(|_| offset < u64::MAX / 2);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() => {
                    if tensors.insert(name.clone(), TensorInfo { name: name.clone(), shape, dtype, offset: s, size }).is_some() {
                        return Err(r.bad(format!("tensor `{name}` appears twice")));
                    }
                }
                _ => {
                    return Err(ModelError::Malformed {
                        path: path.to_path_buf(),
                        reason: format!("tensor `{name}` data (offset {offset}, {size} bytes) runs past the end of the {}-byte file", bytes.len()),
                    })
                }
            }
        }
        check_tiling(&tensors, data_start, alignment, bytes.len()).map_err(|reason| ModelError::Malformed { path: path.to_path_buf(), reason })?;
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, bytes })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned metadata value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key).and_then(MetaValue::as_u64).ok_or_else(|| self.malformed(format!("metadata `{key}` is missing or not an integer")))
    }

    /// A required string metadata value.
    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key).and_then(MetaValue::as_str).ok_or_else(|| self.malformed(format!("metadata `{key}` is missing or not a string")))
    }

    fn malformed(&self, reason: String) -> ModelError {
        ModelError::Malformed { path: self.path.clone(), reason }
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        Ok((info, &self.bytes[info.offset..info.offset + info.size]))
    }

    /// A tensor as candle's quantised type (data copied), checked against `expected`.
    pub fn qtensor(&self, name: &str, expected: &[usize]) -> Result<QTensor> {
        let (info, data) = self.tensor_bytes(name)?;
        if info.shape != expected {
            return Err(ModelError::TensorShape { name: name.into(), got: info.shape.clone(), expected: expected.to_vec() });
        }
        qtensor_from_ggml(info.dtype, data, info.shape.clone(), &Device::Cpu)
            .map_err(|e| ModelError::Unsupported(format!("tensor `{name}` of type {:?}: {e}", info.dtype)))
    }

    /// A tensor dequantised to `f32`, checked against `expected`.
    pub fn f32_tensor(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let q = self.qtensor(name, expected)?;
        Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Writes a GGUF file (version 3) — used by tests and tools to make small models.
pub mod writer {
    use super::MetaValue;
    use crate::error::Result;
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::collections::BTreeMap;

    /// The shape of a model written by [`small_llama`].
    #[derive(Debug, Clone, Copy, Default)]
    pub struct SmallLlama {
        /// Blocks.
        pub layers: usize,
        /// Residual width.
        pub hidden: usize,
        /// Query heads.
        pub heads: usize,
        /// KV heads.
        pub kv_heads: usize,
        /// MLP width.
        pub ffn: usize,
        /// Context length.
        pub context: usize,
        /// The chat template (`None`: a small role/content one).
        pub template: Option<&'static str>,
    }

    /// A byte-level GPT-2 vocabulary: the 256 byte symbols, two merges (`he`, `ll`), then
    /// `<s>` and `</s>`. Returns (tokens, merges).
    pub fn byte_vocab() -> (Vec<String>, Vec<String>) {
        // GPT-2 byte-to-unicode map.
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        let mut tokens: Vec<String> = pairs.iter().filter_map(|&(_, c)| char::from_u32(c)).map(|c| c.to_string()).collect();
        tokens.extend(["he".to_string(), "ll".to_string(), "<s>".to_string(), "</s>".to_string()]);
        (tokens, vec!["h e".into(), "l l".into()])
    }

    /// A whole GGUF file of a small Llama-architecture model with the [`byte_vocab`]
    /// tokenizer and a chat template: `named` holds every weight by its GGUF name with its
    /// shape and `f32` values (tied embeddings: no `output.weight` needed); vectors are
    /// written as F32, matrices quantised to `matrix_type` (candle's quantisation).
    pub fn small_llama(shape: &SmallLlama, named: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, matrix_type: GgmlDType) -> Result<Vec<u8>> {
        let (tokens, merges) = byte_vocab();
        let strs = |v: &[String]| MetaValue::Array(v.iter().map(|s| MetaValue::String(s.clone())).collect());
        let n = tokens.len();
        let mut types = vec![MetaValue::I64(1); n];
        types[n - 2] = MetaValue::I64(3);
        types[n - 1] = MetaValue::I64(3);
        let meta = vec![
            ("general.architecture", MetaValue::String("llama".into())),
            ("llama.block_count", MetaValue::U64(shape.layers as u64)),
            ("llama.embedding_length", MetaValue::U64(shape.hidden as u64)),
            ("llama.feed_forward_length", MetaValue::U64(shape.ffn as u64)),
            ("llama.attention.head_count", MetaValue::U64(shape.heads as u64)),
            ("llama.attention.head_count_kv", MetaValue::U64(shape.kv_heads as u64)),
            ("llama.context_length", MetaValue::U64(shape.context as u64)),
            ("llama.rope.freq_base", MetaValue::F64(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", MetaValue::F64(1e-5)),
            ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", MetaValue::String("smollm".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.merges", strs(&merges)),
            ("tokenizer.ggml.token_type", MetaValue::Array(types)),
            ("tokenizer.ggml.bos_token_id", MetaValue::U64((n - 2) as u64)),
            ("tokenizer.ggml.eos_token_id", MetaValue::U64((n - 1) as u64)),
            ("tokenizer.chat_template", MetaValue::String(shape.template.unwrap_or("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}").into())),
        ];
        let mut tensors = Vec::with_capacity(named.len());
        for (name, (dims, data)) in named {
            let dtype = if dims.len() == 1 { GgmlDType::F32 } else { matrix_type };
            let t = candle_core::Tensor::from_slice(data, dims.as_slice(), &candle_core::Device::Cpu)?;
            let bytes = QTensor::quantize(&t, dtype)?.data()?.to_vec();
            tensors.push(TensorData { name: name.clone(), shape: dims.clone(), dtype, bytes });
        }
        Ok(to_bytes(&meta, &tensors))
    }

    /// A tensor to write: name, shape (outermost first), type and raw bytes.
    pub struct TensorData {
        /// Tensor name.
        pub name: String,
        /// Shape, outermost first.
        pub shape: Vec<usize>,
        /// Element type.
        pub dtype: GgmlDType,
        /// Raw bytes in ggml layout.
        pub bytes: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U64(x) => out.extend(x.to_le_bytes()),
            MetaValue::I64(x) => out.extend(x.to_le_bytes()),
            MetaValue::F64(x) => out.extend(x.to_le_bytes()),
            MetaValue::Bool(b) => out.push(*b as u8),
            MetaValue::String(s) => put_str(out, s),
            MetaValue::Array(a) => {
                out.extend(a.first().map_or(10, type_id).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
        }
    }

    fn dtype_id(d: GgmlDType) -> u32 {
        match d {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::Q4_0 => 2,
            GgmlDType::Q4_1 => 3,
            GgmlDType::Q8_0 => 8,
            GgmlDType::Q4K => 12,
            GgmlDType::Q5K => 13,
            GgmlDType::Q6K => 14,
            GgmlDType::BF16 => 30,
            _ => unimplemented!("writer does not know {d:?}"),
        }
    }

    /// Serialises metadata and tensors into GGUF bytes (alignment 32).
    pub fn to_bytes(metadata: &[(&str, MetaValue)], tensors: &[TensorData]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend((t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(dtype_id(t.dtype).to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.bytes.len()).div_ceil(32) * 32;
        }
        let start = out.len().div_ceil(32) * 32;
        out.resize(start, 0);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(start + off, 0);
            out.extend(&t.bytes);
        }
        out
    }
}
