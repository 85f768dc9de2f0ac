//! Host → GPU weight upload through pinned staging buffers (CUDA build).
//!
//! candle's own path copies a tensor's bytes into a Vec, then into GPU memory from pageable
//! memory (staged by the driver, one copy at a time: ~7–10 GB/s on an H200). Here worker threads
//! each take a chunk, copy it from the mmapped file into a free page-locked buffer and queue that
//! buffer's copy to the GPU themselves, so reading the page cache (the limit: one thread cannot
//! read it at PCIe speed) and the PCIe transfers (55 GB/s pinned on an H200) overlap, with no wait
//! between chunks.
//!
//! A model loads *streamed* (`Streamed`): its tensors are allocated at once and their copies run
//! on a second stream, layer after layer, on a thread of their own, while the model already runs:
//! the forward pass makes the device wait for each layer's copies (`Gate`), so the first batch
//! computes on the layers that have arrived instead of the GPU idling through the whole upload.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;

use super::weights::{stack_loaded, TensorSource, Weights};
use super::Pending;

/// How the upload runs; GLM4_VERIFY_UPLOAD="chunk=MiB,buffers=N,threads=N,wc=0|1,stream=0|1"
/// overrides it (for measuring; see BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
struct Config {
    chunk: usize,
    buffers: usize,
    threads: usize,
    /// Write-combined staging memory (the CPU only writes it; slow for the CPU to read).
    write_combined: bool,
    /// Let the model run while its weights arrive (`stream=0`: wait for all of them first).
    streamed: bool,
}

fn config() -> Config {
    static C: OnceLock<Config> = OnceLock::new();
    *C.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(8, |n| n.get());
        // Measured on an H200 host (BENCHMARKS.md): small chunks in few buffers load fastest
        // (2 MiB × 20: 0.67 s for 18.8 GB; 8 MiB × 32: 0.84 s; 32 MiB × 16: slowest), and
        // 8 threads writing write-combined memory a little faster again (0.60 s).
        let mut c =
            Config { chunk: 2 << 20, buffers: 20, threads: cores.clamp(2, 8), write_combined: true, streamed: true };
        for kv in std::env::var("GLM4_VERIFY_UPLOAD").unwrap_or_default().split(',') {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let Ok(v) = v.trim().parse::<usize>() else { continue };
            match k.trim() {
                "chunk" => c.chunk = v.max(1) << 20,
                "buffers" => c.buffers = v.max(2),
                "threads" => c.threads = v.max(1),
                "wc" => c.write_combined = v != 0,
                "stream" => c.streamed = v != 0,
                _ => {}
            }
        }
        c
    })
}

struct Buffer {
    host: PinnedHostSlice<u8>,
    /// Recorded after the copy out of `host`; waited on before refilling it.
    done: CudaEvent,
}

/// The staging buffers of the process, oldest use first (uploads take them one at a time).
static STAGING: Mutex<Option<VecDeque<Buffer>>> = Mutex::new(None);

/// One copy of at most a chunk: `rows` rows of `row_bytes` bytes, one after the other in the file
/// from byte `src` of map `map`, `pitch` bytes apart on the device from `dst`.
#[derive(Debug, Clone, Copy)]
struct Unit {
    map: usize,
    src: usize,
    rows: usize,
    row_bytes: usize,
    dst: sys::CUdeviceptr,
    pitch: usize,
}

/// Copies to make, in order: `maps` hold the bytes, part p is `units[ends[p-1]..ends[p]]`.
#[derive(Default)]
struct Copies {
    maps: Vec<Arc<Mmap>>,
    units: Vec<Unit>,
    ends: Vec<usize>,
}

impl Copies {
    fn map_index(&mut self, map: &Arc<Mmap>) -> usize {
        match self.maps.iter().position(|m| Arc::ptr_eq(m, map)) {
            Some(i) => i,
            None => {
                self.maps.push(map.clone());
                self.maps.len() - 1
            }
        }
    }

    /// Splits `rows` rows of `row_bytes` (from `src` in `map`; `pitch` apart at `dst`) into units of
    /// at most a chunk each.
    fn add(&mut self, map: usize, src: usize, rows: usize, row_bytes: usize, dst: sys::CUdeviceptr, pitch: usize) {
        let chunk = config().chunk;
        let unit = |src: usize, rows: usize, row_bytes: usize, dst: usize| Unit {
            map,
            src,
            rows,
            row_bytes,
            dst: dst as sys::CUdeviceptr,
            pitch,
        };
        let dst = dst as usize;
        if pitch == row_bytes || rows == 1 {
            // Dense: one run of bytes.
            let total = rows * row_bytes;
            for off in (0..total).step_by(chunk) {
                self.units.push(unit(src + off, 1, chunk.min(total - off), dst + off));
            }
        } else if row_bytes <= chunk {
            let per = chunk / row_bytes;
            for r in (0..rows).step_by(per) {
                self.units.push(unit(src + r * row_bytes, per.min(rows - r), row_bytes, dst + r * pitch));
            }
        } else {
            for r in 0..rows {
                for off in (0..row_bytes).step_by(chunk) {
                    self.units.push(unit(
                        src + r * row_bytes + off,
                        1,
                        chunk.min(row_bytes - off),
                        dst + r * pitch + off,
                    ));
                }
            }
        }
    }

    /// Queues the copies of units `range` on `stream` from up to `threads` threads; returns once all
    /// are queued (later work on the stream runs after them).
    fn queue(&self, range: std::ops::Range<usize>, stream: &Arc<CudaStream>) -> Result<()> {
        let cfg = config();
        let mut guard = STAGING.lock().map_err(|_| anyhow!("weight upload buffers poisoned"))?;
        if guard.is_none() {
            *guard = Some(new_buffers(stream, cfg)?);
        }
        let Some(pool) = guard.as_mut() else { bail!("weight upload buffers missing") };
        let pool = Mutex::new(std::mem::take(pool));
        let next = AtomicUsize::new(range.start);
        let work = || self.work(&next, range.end, &pool, stream);
        let workers = cfg.threads.min(range.len());
        let r = if workers <= 1 {
            work()
        } else {
            std::thread::scope(|s| -> Result<()> {
                let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
                for h in handles {
                    h.join().map_err(|_| anyhow!("a weight upload thread panicked"))??;
                }
                Ok(())
            })
        };
        *guard = Some(pool.into_inner().map_err(|_| anyhow!("weight upload buffers poisoned"))?);
        r
    }

    /// Takes units until none is left: waits for the least recently used buffer to be free, fills
    /// it, queues its copy to the GPU and records when that copy is done.
    fn work(
        &self,
        next: &AtomicUsize,
        end: usize,
        pool: &Mutex<VecDeque<Buffer>>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        stream.context().bind_to_thread()?;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                return Ok(());
            }
            let u = self.units[i];
            let len = u.rows * u.row_bytes;
            let src = &self.maps[u.map][u.src..u.src + len];
            let mut buf = pool.lock().map_err(|_| anyhow!("poisoned"))?.pop_front().ok_or_else(|| {
                anyhow!("no free weight upload buffer (more threads than buffers: GLM4_VERIFY_UPLOAD)")
            })?;
            let r = (|| -> Result<()> {
                // The GPU has finished reading this buffer.
                buf.done.synchronize()?;
                // SAFETY: the buffer holds at least a chunk (≥ len bytes) of pinned memory and is not
                // in use by the GPU (waited above) nor by another thread (taken out of the pool).
                let host = unsafe { std::slice::from_raw_parts_mut(buf.host.as_mut_ptr()?, len) };
                host.copy_from_slice(src);
                // SAFETY: the destination tensor has room for these rows at these offsets (`Streamed`
                // and `upload` allocate it so) and outlives the copy (`Gate` keeps it alive).
                unsafe { copy_to_device(&u, host, stream.cu_stream())? };
                buf.done.record(stream)?;
                Ok(())
            })();
            pool.lock().map_err(|_| anyhow!("poisoned"))?.push_back(buf);
            r?;
        }
    }
}

/// Queues the copy of unit `u` from `host` (its rows, back to back) to the device.
///
/// # Safety
/// `u.dst` must have room for `u.rows` rows `u.pitch` bytes apart; `host` must stay valid and
/// unchanged until the copy is done.
unsafe fn copy_to_device(u: &Unit, host: &[u8], stream: sys::CUstream) -> Result<()> {
    if u.rows == 1 {
        result::memcpy_htod_async(u.dst, host, stream)?;
        return Ok(());
    }
    let p = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
        srcHost: host.as_ptr() as *const std::ffi::c_void,
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: u.row_bytes,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: u.dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: u.pitch,
        WidthInBytes: u.row_bytes,
        Height: u.rows,
    };
    sys::cuMemcpy2DAsync_v2(&p, stream).result()?;
    Ok(())
}

fn new_buffers(stream: &Arc<CudaStream>, cfg: Config) -> Result<VecDeque<Buffer>> {
    let ctx = stream.context();
    let flags = if cfg.write_combined { sys::CU_MEMHOSTALLOC_WRITECOMBINED } else { 0 };
    let mut bufs = VecDeque::with_capacity(cfg.buffers.max(cfg.threads));
    for _ in 0..cfg.buffers.max(cfg.threads) {
        // SAFETY: contents are written before every read.
        let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(cfg.chunk, flags)? };
        let done = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
        bufs.push_back(Buffer { host, done });
    }
    Ok(bufs)
}

/// Uninitialised device memory for `elems` values of `dtype` (every byte is written before use)
/// and its address; `None` for dtypes these copies do not handle.
fn alloc(dtype: DType, elems: usize, dev: &CudaDevice) -> Result<Option<(CudaStorage, sys::CUdeviceptr)>> {
    fn typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        elems: usize,
        dev: &CudaDevice,
    ) -> Result<(CudaStorage, sys::CUdeviceptr)> {
        // SAFETY: the caller writes every byte before the tensor is read.
        let slice: CudaSlice<T> = unsafe { dev.alloc::<T>(elems)? };
        let ptr = slice.device_ptr(&dev.cuda_stream()).0;
        Ok((CudaStorage::wrap_cuda_slice(slice, dev.clone()), ptr))
    }
    Ok(Some(match dtype {
        DType::BF16 => typed::<bf16>(elems, dev)?,
        DType::F16 => typed::<f16>(elems, dev)?,
        DType::F32 => typed::<f32>(elems, dev)?,
        _ => return Ok(None),
    }))
}

/// A tensor of `dtype`/`shape` on `dev` from its raw little-endian bytes (`range` of `map`),
/// uploaded now on the device's stream; `None` for dtypes this path does not handle.
pub fn upload(
    map: &Arc<Mmap>,
    range: std::ops::Range<usize>,
    dtype: DType,
    shape: &[usize],
    dev: &CudaDevice,
) -> Result<Option<Tensor>> {
    let elems: usize = shape.iter().product();
    if elems * dtype.size_in_bytes() != range.len() {
        bail!("shape {shape:?} of {dtype:?} needs {} bytes, not {}", elems * dtype.size_in_bytes(), range.len());
    }
    let Some((storage, dst)) = alloc(dtype, elems, dev)? else { return Ok(None) };
    let mut copies = Copies::default();
    let m = copies.map_index(map);
    copies.add(m, range.start, 1, range.len(), dst, range.len());
    copies.queue(0..copies.units.len(), &dev.cuda_stream())?;
    Ok(Some(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)))
}

/// A model's weights as a `TensorSource` whose tensors are allocated at once and filled later, in
/// part order, by `start`. Tensors it cannot copy as they are (another dtype than the files') load
/// at once through `Weights`.
pub struct Streamed<'w> {
    weights: &'w Weights,
    dev: CudaDevice,
    /// The part the tensors loaded now belong to (`TensorSource::begin_part`).
    part: Cell<usize>,
    /// Every tensor's copies, in load order (the tensors themselves live in the model).
    copies: RefCell<Copies>,
    /// (part, that tensor's units in `copies`) per tensor.
    parts: RefCell<Vec<(usize, std::ops::Range<usize>)>>,
}

impl<'w> Streamed<'w> {
    pub fn new(weights: &'w Weights, dev: &CudaDevice) -> Self {
        Streamed {
            weights,
            dev: dev.clone(),
            part: Cell::new(0),
            copies: RefCell::new(Copies::default()),
            parts: RefCell::new(Vec::new()),
        }
    }

    /// Starts the copies on a stream of their own, from a thread of their own, part after part;
    /// the returned gate makes the device's stream wait for a part before using it.
    pub fn start(self) -> Result<Arc<Gate>> {
        let main = self.dev.cuda_stream();
        let ctx = main.context().clone();
        // Parts in order: units of part 0 first, and so on (`Glm::load_with_room` loads the output
        // layer second, but the forward pass needs it last).
        let mut copies = self.copies.into_inner();
        let mut spans = self.parts.into_inner();
        spans.sort_by_key(|(p, _)| *p);
        let parts = spans.last().map_or(0, |(p, _)| p + 1);
        let mut units = Vec::with_capacity(copies.units.len());
        let mut ends = Vec::with_capacity(parts);
        for p in 0..parts {
            for (_, r) in spans.iter().filter(|(q, _)| *q == p) {
                units.extend_from_slice(&copies.units[r.clone()]);
            }
            ends.push(units.len());
        }
        copies.units = units;
        copies.ends = ends;
        let events = (0..parts)
            .map(|_| ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let copy_stream = ctx.new_stream()?;
        // The tensors were allocated on the device's stream: the copies start after that.
        copy_stream.wait(&main.record_event(None)?)?;
        let gate = Arc::new(Gate {
            main,
            events,
            state: Mutex::new(State { queued: 0, failed: None, finished: None }),
            changed: Condvar::new(),
            all: AtomicBool::new(parts == 0),
            runner: Mutex::new(None),
        });
        if !config().streamed {
            run(&copies, &copy_stream, &gate);
            gate.wait_all()?;
            return Ok(gate);
        }
        let g = gate.clone();
        let handle = std::thread::Builder::new()
            .name("weights upload".into())
            .spawn(move || run(&copies, &copy_stream, &g))
            .map_err(|e| anyhow!("cannot start the weight upload thread: {e}"))?;
        *gate.runner.lock().map_err(|_| anyhow!("weight upload poisoned"))? = Some(handle);
        Ok(gate)
    }
}

impl TensorSource for Streamed<'_> {
    fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    fn load_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.load_stacked(&[(name, shape)], 0, dtype, device)
    }

    fn load_stacked(&self, parts: &[(&str, &[usize])], extra: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let w = self.weights;
        for (name, shape) in parts {
            w.check_shape(name, shape)?;
        }
        // Rows of the stack: each part's first dimension; a row is the product of the others.
        let cols = |s: &[usize]| s.iter().skip(1).product::<usize>();
        let Some(&(_, first)) = parts.first() else { bail!("nothing to load") };
        let same_rows = parts.iter().all(|(_, s)| s.len() == first.len() && s[1..] == first[1..]);
        let as_is = parts.iter().all(|(n, _)| w.dtype(n) == Some(dtype));
        if !as_is || !same_rows || first.is_empty() || (extra > 0 && first.len() != 2) {
            return stack_loaded(w, parts, extra, dtype, device);
        }
        let rows: usize = parts.iter().map(|(_, s)| s[0]).sum();
        let (c, size) = (cols(first), dtype.size_in_bytes());
        let Some((storage, base)) = alloc(dtype, rows * (c + extra), &self.dev)? else {
            return stack_loaded(w, parts, extra, dtype, device);
        };
        let mut copies = self.copies.borrow_mut();
        let from = copies.units.len();
        let mut row = 0;
        for (name, shape) in parts {
            let (map, range, file) = w.raw(name)?;
            if range.len() != shape.iter().product::<usize>() * size {
                bail!("{}: tensor {name} ({dtype:?} {shape:?}) does not fit its {} bytes", file.display(), range.len());
            }
            let m = copies.map_index(&map);
            let pitch = (c + extra) * size;
            copies.add(m, range.start, shape[0], c * size, base + (row * pitch) as sys::CUdeviceptr, pitch);
            row += shape[0];
        }
        let to = copies.units.len();
        self.parts.borrow_mut().push((self.part.get(), from..to));
        let mut shape = first.to_vec();
        shape[0] = rows;
        if extra > 0 {
            shape[1] += extra;
        }
        Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
    }

    fn begin_part(&self, p: usize) {
        self.part.set(p);
    }
}

struct State {
    /// Parts whose copies are all queued (and their event recorded).
    queued: usize,
    failed: Option<String>,
    /// When the last copy was done.
    finished: Option<Instant>,
}

/// The progress of a streamed load, shared by the uploading thread and the model.
pub struct Gate {
    main: Arc<CudaStream>,
    /// Recorded on the copy stream after each part's copies.
    events: Vec<CudaEvent>,
    state: Mutex<State>,
    changed: Condvar,
    /// The device's stream already waits for every part.
    all: AtomicBool,
    runner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The uploading thread: queues each part's copies, records its event, tells the waiting model.
fn run(copies: &Copies, stream: &Arc<CudaStream>, gate: &Gate) {
    let _ended = Ended(gate);
    let mut start = 0;
    let mut outcome = Ok(());
    for (p, &end) in copies.ends.iter().enumerate() {
        outcome = copies.queue(start..end, stream).and_then(|_| Ok(gate.events[p].record(stream)?));
        if outcome.is_err() {
            break;
        }
        start = end;
        if let Ok(mut s) = gate.state.lock() {
            s.queued = p + 1;
        }
        gate.changed.notify_all();
    }
    // Even after a failure: nothing queued may still run when the model frees its tensors.
    let synced = stream.synchronize();
    let outcome = outcome.and_then(|_| Ok(synced?));
    super::profile::mark("weights on the device");
    if let Ok(mut s) = gate.state.lock() {
        match outcome {
            Ok(()) => s.finished = Some(Instant::now()),
            Err(e) => s.failed = Some(format!("{e:#}")),
        }
    }
    gate.changed.notify_all();
}

/// Marks the upload failed if its thread ends without an outcome (a panic), so nobody waits forever.
struct Ended<'a>(&'a Gate);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.finished.is_none() && s.failed.is_none() {
            s.failed = Some("the upload thread stopped unexpectedly".into());
        }
        drop(s);
        self.0.changed.notify_all();
    }
}

impl Gate {
    fn wait_part(&self, part: usize) -> Result<()> {
        if self.all.load(Ordering::Acquire) {
            return Ok(());
        }
        let part = part.min(self.events.len().saturating_sub(1));
        let mut s = self.state.lock().map_err(|_| anyhow!("weight upload poisoned"))?;
        while s.queued <= part && s.failed.is_none() {
            s = self.changed.wait(s).map_err(|_| anyhow!("weight upload poisoned"))?;
        }
        if let Some(e) = &s.failed {
            bail!("copying the model's weights to the GPU failed: {e}");
        }
        drop(s);
        self.main.wait(&self.events[part])?;
        // One stream records the events in order: the last one covers all parts.
        if part + 1 == self.events.len() {
            self.all.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn wait_all(&self) -> Result<()> {
        self.wait_part(usize::MAX)
    }
}

impl Pending for Gate {
    fn wait(&self, part: usize) -> Result<()> {
        self.wait_part(part)
    }

    fn finished(&self) -> Option<Instant> {
        let mut s = self.state.lock().ok()?;
        while s.finished.is_none() && s.failed.is_none() {
            s = self.changed.wait(s).ok()?;
        }
        s.finished
    }
}

impl Drop for Gate {
    /// The copies read the files' maps and write the model's tensors: they end before either goes
    /// (the model drops its gate before its tensors).
    fn drop(&mut self) {
        if let Some(h) = self.runner.lock().ok().and_then(|mut r| r.take()) {
            let _ = h.join();
        }
        let _ = self.wait_all();
    }
}
