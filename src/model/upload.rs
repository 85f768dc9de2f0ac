//! Host → GPU weight upload through pinned staging buffers (CUDA build).
//!
//! candle's own path copies a tensor's bytes into a Vec, then into GPU memory from pageable
//! memory (staged by the driver, one copy at a time: ~7–10 GB/s on an H200). Here worker threads
//! each take a chunk of the tensor, copy it from the mmapped file into a free page-locked buffer
//! and queue that buffer's copy to the GPU themselves, so reading the page cache (the limit: one
//! thread cannot read it at PCIe speed) and the PCIe transfers (55 GB/s pinned on an H200) overlap,
//! with no wait between chunks. A tensor's upload returns once all its copies are queued: later work on
//! the stream runs after them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, PinnedHostSlice,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

/// How the upload runs; GLM4_VERIFY_UPLOAD="chunk=MiB,buffers=N,threads=N,wc=0|1" overrides it
/// (for measuring; see BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
struct Config {
    chunk: usize,
    buffers: usize,
    threads: usize,
    /// Write-combined staging memory (the CPU only writes it; slow for the CPU to read).
    write_combined: bool,
}

fn config() -> Config {
    static C: OnceLock<Config> = OnceLock::new();
    *C.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(8, |n| n.get());
        // Measured on an H200 host (BENCHMARKS.md): small chunks in few buffers load fastest
        // (2 MiB × 20: 0.67 s for 18.8 GB; 8 MiB × 32: 0.84 s; 32 MiB × 16: slowest), and
        // 8 threads writing write-combined memory a little faster again (0.60 s).
        let mut c = Config { chunk: 2 << 20, buffers: 20, threads: cores.clamp(2, 8), write_combined: true };
        for kv in std::env::var("GLM4_VERIFY_UPLOAD").unwrap_or_default().split(',') {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let Ok(v) = v.trim().parse::<usize>() else { continue };
            match k.trim() {
                "chunk" => c.chunk = v.max(1) << 20,
                "buffers" => c.buffers = v.max(2),
                "threads" => c.threads = v.max(1),
                "wc" => c.write_combined = v != 0,
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

/// The staging buffers of the process, oldest use first (loads run one at a time).
static STAGING: Mutex<Option<VecDeque<Buffer>>> = Mutex::new(None);

/// A tensor of `dtype`/`shape` on `dev` from its raw little-endian bytes; `None` for dtypes this
/// path does not handle (the caller uses candle's).
pub fn upload(bytes: &[u8], dtype: DType, shape: &[usize], dev: &CudaDevice) -> Result<Option<Tensor>> {
    let elems: usize = shape.iter().product();
    if elems * dtype.size_in_bytes() != bytes.len() {
        bail!("shape {shape:?} of {dtype:?} needs {} bytes, not {}", elems * dtype.size_in_bytes(), bytes.len());
    }
    let storage = match dtype {
        DType::BF16 => copy::<bf16>(bytes, dev)?,
        DType::F16 => copy::<f16>(bytes, dev)?,
        DType::F32 => copy::<f32>(bytes, dev)?,
        _ => return Ok(None),
    };
    Ok(Some(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)))
}

/// The stream's handle for the worker threads (the driver API may be called from any thread).
#[derive(Clone, Copy)]
struct RawStream(sys::CUstream);
// SAFETY: a CUstream is an opaque driver handle; the driver API is thread-safe.
unsafe impl Send for RawStream {}
unsafe impl Sync for RawStream {}

fn copy<T: CudaDType + DeviceRepr + ValidAsZeroBits>(bytes: &[u8], dev: &CudaDevice) -> Result<CudaStorage> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        bail!("{} bytes are not a whole number of {size}-byte elements", bytes.len());
    }
    let cfg = config();
    let stream = dev.cuda_stream();
    // SAFETY: every byte is written below before the tensor is used (same stream).
    let mut dst: CudaSlice<T> = unsafe { dev.alloc::<T>(bytes.len() / size)? };
    let mut guard = STAGING.lock().map_err(|_| anyhow!("weight upload buffers poisoned"))?;
    if guard.is_none() {
        *guard = Some(new_buffers(&stream, cfg)?);
    }
    let Some(pool) = guard.as_mut() else { bail!("weight upload buffers missing") };
    {
        let (base, _sync) = dst.device_ptr_mut(&stream);
        let chunks = bytes.len().div_ceil(cfg.chunk);
        let job = Job { bytes, base, chunk: cfg.chunk, next: AtomicUsize::new(0), stream: &stream };
        let pool = Mutex::new(std::mem::take(pool));
        let workers = cfg.threads.min(chunks);
        if workers <= 1 {
            job.work(&pool, stream.context())?;
        } else {
            std::thread::scope(|s| -> Result<()> {
                let handles: Vec<_> = (0..workers).map(|_| s.spawn(|| job.work(&pool, stream.context()))).collect();
                for h in handles {
                    h.join().map_err(|_| anyhow!("a weight upload thread panicked"))??;
                }
                Ok(())
            })?;
        }
        *guard = Some(pool.into_inner().map_err(|_| anyhow!("weight upload buffers poisoned"))?);
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}

/// One tensor's upload, shared by its worker threads: chunk i goes to `base + i·chunk`.
struct Job<'a> {
    bytes: &'a [u8],
    base: sys::CUdeviceptr,
    chunk: usize,
    next: AtomicUsize,
    stream: &'a Arc<CudaStream>,
}

impl Job<'_> {
    /// Takes chunks until none is left: waits for the least recently used buffer to be free,
    /// fills it, queues its copy to the GPU and records when that copy is done.
    fn work(&self, pool: &Mutex<VecDeque<Buffer>>, ctx: &Arc<CudaContext>) -> Result<()> {
        ctx.bind_to_thread()?;
        let stream = RawStream(self.stream.cu_stream());
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let start = i * self.chunk;
            if start >= self.bytes.len() {
                return Ok(());
            }
            let src = &self.bytes[start..(start + self.chunk).min(self.bytes.len())];
            let mut buf = pool.lock().map_err(|_| anyhow!("poisoned"))?.pop_front().ok_or_else(|| {
                anyhow!("no free weight upload buffer (more threads than buffers: GLM4_VERIFY_UPLOAD)")
            })?;
            let r = (|| -> Result<()> {
                buf.done.synchronize()?; // the GPU has finished reading this buffer
                                         // SAFETY: the buffer holds at least `chunk` bytes of pinned memory and is not in use by
                                         // the GPU (waited above) nor by another thread (taken out of the pool).
                let host = unsafe { std::slice::from_raw_parts_mut(buf.host.as_mut_ptr()?, src.len()) };
                host.copy_from_slice(src);
                // SAFETY: the destination has bytes.len() bytes; this writes src.len() of them at `start`.
                unsafe { result::memcpy_htod_async(self.base + start as sys::CUdeviceptr, host, stream.0)? };
                buf.done.record(self.stream)?;
                Ok(())
            })();
            pool.lock().map_err(|_| anyhow!("poisoned"))?.push_back(buf);
            r?;
        }
    }
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
