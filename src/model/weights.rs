//! Memory-mapped safetensors: one file or shards listed by `model.safetensors.index.json`.
//! Every error names the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

/// Where model tensors come from: safetensors files, or tensors built in memory (the demo).
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// Loads a tensor, checks its shape, converts it to `dtype` on `device`.
    fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// Tensors `parts` (name, shape [rows, ...]) stacked along their first dimension, with `extra`
    /// columns after each row of a matrix (zeros here; a streamed load leaves them for the caller to
    /// fill: the LoRA side path's columns).
    fn load_stacked(&self, parts: &[(&str, &[usize])], extra: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        stack_loaded(self, parts, extra, dtype, device)
    }
    /// The tensors loaded from now on belong to part `p` of the model (a streamed load uploads
    /// them in part order and tells the model when each part has arrived).
    fn begin_part(&self, _p: usize) {}
}

/// `TensorSource::load_stacked` by loading each part and concatenating them on the device.
pub fn stack_loaded<S: TensorSource + ?Sized>(
    src: &S,
    parts: &[(&str, &[usize])],
    extra: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let ts: Vec<Tensor> = parts.iter().map(|(n, s)| src.load_shaped(n, s, dtype, device)).collect::<Result<_>>()?;
    let t = match ts.as_slice() {
        [one] => one.clone(),
        _ => Tensor::cat(&ts, 0)?,
    };
    if extra == 0 {
        return Ok(t);
    }
    let rows = t.dim(0)?;
    Ok(Tensor::cat(&[&t, &Tensor::zeros((rows, extra), dtype, device)?], 1)?)
}

impl TensorSource for Weights {
    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
    fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Weights::load_shaped(self, name, shape, dtype, device)
    }
}

impl TensorSource for HashMap<String, Tensor> {
    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.get(name).ok_or_else(|| anyhow!("tensor {name} is missing"))?;
        if t.dims() != shape {
            bail!("tensor {name} has shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// What is wrong with a safetensors file that `read_metadata` rejected, naming the tensor where
/// one is to blame (the crate's own errors do not).
fn header_problem(bytes: &[u8]) -> Option<String> {
    let len = bytes.len() as u64;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    if n > len - 8 {
        return Some(format!("the header length is {n} bytes, but the file has only {len}"));
    }
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n as usize]).ok()?;
    let data = len - 8 - n;
    let mut spans = Vec::new();
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype: StDtype = serde_json::from_value(t.get("dtype")?.clone()).ok()?;
        let shape: Vec<u64> = serde_json::from_value(t.get("shape")?.clone()).ok()?;
        let [start, end]: [u64; 2] = serde_json::from_value(t.get("data_offsets")?.clone()).ok()?;
        if start > end || end > data {
            return Some(format!("tensor {name}: data_offsets [{start}, {end}] lie outside the {data} data bytes"));
        }
        let bits = shape.iter().try_fold(dtype.bitsize() as u64, |acc, &d| acc.checked_mul(d));
        if bits.map(|b| b.div_ceil(8)) != Some(end - start) {
            let need = bits.map_or("more than 2^64 bits".into(), |b| format!("{} bytes", b.div_ceil(8)));
            return Some(format!(
                "tensor {name}: {dtype:?} {shape:?} needs {need}, its data_offsets span {}",
                end - start
            ));
        }
        spans.push((start, end, name));
    }
    spans.sort();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 != w[0].1) {
        let how = if w[1].0 < w[0].1 { "overlap" } else { "leave a gap between them" };
        return Some(format!("tensors {} and {} {how}", w[0].2, w[1].2));
    }
    match spans.last() {
        Some(&(_, end, _)) if end < data => Some(format!("{} bytes follow the last tensor", data - end)),
        _ => None,
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range inside the file's mmap.
    start: usize,
    end: usize,
}

/// Read-only view of all tensors of a model or adapter.
pub struct Weights {
    files: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
}

impl Weights {
    /// Opens a model directory: `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", index.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            let mut files = Vec::new();
            for s in shards {
                // Shards are files of the model directory (as every save writes them): a name with a
                // path in it would make glm4-verify read files elsewhere.
                let plain = Path::new(&s).file_name().is_some_and(|f| f == s.as_str()) && s != "." && s != "..";
                if !plain {
                    bail!(
                        "{} names shard {s:?}, which is not a file name inside {}: shards must sit next to the index",
                        index.display(),
                        dir.display()
                    );
                }
                let p = dir.join(&s);
                if !p.is_file() {
                    bail!(
                        "{} names shard {s}, which is missing from {}; the download or save is incomplete",
                        index.display(),
                        dir.display()
                    );
                }
                files.push(p);
            }
            let w = Self::open(&files)?;
            for (name, f) in map {
                if !w.entries.contains_key(name) {
                    bail!(
                        "{} maps tensor {name} to {}, but that file does not contain it",
                        index.display(),
                        f.as_str().unwrap_or("?")
                    );
                }
            }
            return Ok(w);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(&[single]);
        }
        // Some exporters write other names; take every *.safetensors in the directory.
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list model directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            bail!(
                "no model weights in {}: expected model.safetensors or model.safetensors.index.json \
                 (PyTorch .bin checkpoints: re-save with safe_serialization=True)",
                dir.display()
            );
        }
        Self::open(&found)
    }

    /// Opens explicit safetensors files (memory-mapped, read-only).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened read-only and the map is only read; a concurrent writer
            // could change the bytes under us, which is a property of any mmap-based loader.
            // populate: fault the pages in up front (one kernel pass) instead of one page fault per
            // 4 KiB while tensors are copied to the device.
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                anyhow!(
                    "{} is not a valid safetensors file ({}); the file is truncated or corrupt: re-save or re-download it",
                    path.display(),
                    header_problem(&map).unwrap_or_else(|| e.to_string())
                )
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    StDtype::F32 => DType::F32,
                    StDtype::F64 => DType::F64,
                    StDtype::I64 => DType::I64,
                    StDtype::U8 => DType::U8,
                    StDtype::U32 => DType::U32,
                    StDtype::BOOL => DType::U8,
                    other => bail!(
                        "{}: tensor {name} has dtype {other:?}, which glm4-verify does not read (bf16, f16, f32)",
                        path.display()
                    ),
                };
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                if end > map.len() || start > end {
                    bail!("{}: tensor {name} lies past the end of the file (truncated?)", path.display());
                }
                if entries.contains_key(&name) {
                    bail!("tensor {name} appears in more than one file ({})", path.display());
                }
                entries.insert(name, Entry { file: i, dtype, shape: info.shape.clone(), start, end });
            }
            maps.push(Arc::new(map));
        }
        Ok(Weights { files: files.to_vec(), maps, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// The dtype holding most of the bytes (the checkpoint's precision).
    pub fn main_dtype(&self) -> Option<DType> {
        let mut by: HashMap<DType, usize> = HashMap::new();
        for e in self.entries.values() {
            *by.entry(e.dtype).or_default() += e.end - e.start;
        }
        by.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// Total bytes of tensor data (for load-speed reporting).
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            anyhow!(
                "tensor {name} is missing from {}; the checkpoint is incomplete or of another layout",
                self.describe_files()
            )
        })
    }

    /// Loads a tensor onto `device` converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = &self.maps[e.file][e.start..e.end];
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let up =
                super::upload::upload(&self.maps[e.file], e.start..e.end, e.dtype, &e.shape, d).map_err(|err| {
                    anyhow!("{}: tensor {name} ({:?} {:?}): {err:#}", self.files[e.file].display(), e.dtype, e.shape)
                })?;
            if let Some(t) = up {
                return Ok(t.to_dtype(dtype)?);
            }
        }
        let t = Tensor::from_raw_buffer(bytes, e.dtype, &e.shape, device).map_err(|err| {
            anyhow!(
                "{}: tensor {name} ({:?} {:?}) does not fit its {} bytes: {err}",
                self.files[e.file].display(),
                e.dtype,
                e.shape,
                bytes.len()
            )
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// Rows `rows` of a 2-D tensor, as f32 values one row after the other, read from the files
    /// without loading the rest of it.
    pub fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let &[n, cols] = e.shape.as_slice() else {
            bail!("tensor {name} in {} has shape {:?}, expected a matrix", self.describe_files(), e.shape);
        };
        let row_bytes = cols * e.dtype.size_in_bytes();
        let bytes = &self.maps[e.file][e.start..e.end];
        let mut buf = Vec::with_capacity(rows.len() * row_bytes);
        for &r in rows {
            let part = (r < n).then(|| bytes.get(r * row_bytes..(r + 1) * row_bytes)).flatten().ok_or_else(|| {
                anyhow!(
                    "tensor {name} ({:?} {:?}) has no row {r} in {}",
                    e.dtype,
                    e.shape,
                    self.files[e.file].display()
                )
            })?;
            buf.extend_from_slice(part);
        }
        let t = Tensor::from_raw_buffer(&buf, e.dtype, &[rows.len(), cols], &Device::Cpu)?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.check_shape(name, shape)?;
        self.load(name, dtype, device)
    }

    /// Fails, naming the files, when tensor `name` exists with another shape than `shape`.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        match self.shape(name) {
            Some(s) if s != shape => bail!(
                "tensor {name} in {} has shape {s:?}, expected {shape:?} from config.json; config and weights disagree",
                self.describe_files()
            ),
            _ => Ok(()),
        }
    }

    /// Where tensor `name`'s bytes lie: its file's map, the byte range in it, and the file.
    pub fn raw(&self, name: &str) -> Result<(Arc<Mmap>, std::ops::Range<usize>, &Path)> {
        let e = self.entry(name)?;
        Ok((self.maps[e.file].clone(), e.start..e.end, &self.files[e.file]))
    }

    /// The first tensor (by name) holding NaN or Inf: read one at a time, for error messages.
    pub fn first_nonfinite(&self) -> Result<Option<String>> {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        for n in names {
            if !self.entries[n].dtype.is_float() {
                continue;
            }
            let t = self.load(n, DType::F32, &Device::Cpu)?.flatten_all()?;
            if t.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
                return Ok(Some(n.clone()));
            }
        }
        Ok(None)
    }

    fn describe_files(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} ({} shards)",
                many.first().and_then(|p| p.parent()).map(|p| p.display().to_string()).unwrap_or_default(),
                many.len()
            ),
        }
    }
}
