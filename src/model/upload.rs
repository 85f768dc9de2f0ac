//! Host → GPU weight upload through pinned staging buffers (CUDA build).
//!
//! candle's own path copies a tensor's bytes into a Vec, then into GPU memory from pageable
//! memory (staged by the driver, one copy at a time). Here several threads copy the mmapped bytes
//! into page-locked buffers while the GPU pulls the previous buffer asynchronously.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

const CHUNK: usize = 64 << 20;
const BUFFERS: usize = 3;
const THREADS: usize = 8;

struct Buffer {
    host: PinnedHostSlice<u8>,
    /// Recorded after the copy out of `host`; waited on before refilling it.
    done: CudaEvent,
}

struct Staging {
    bufs: Vec<Buffer>,
    next: usize,
}

/// One set of buffers for the process (loads run one at a time).
static STAGING: Mutex<Option<Staging>> = Mutex::new(None);

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

fn copy<T: CudaDType + DeviceRepr + ValidAsZeroBits>(bytes: &[u8], dev: &CudaDevice) -> Result<CudaStorage> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        bail!("{} bytes are not a whole number of {size}-byte elements", bytes.len());
    }
    let stream = dev.cuda_stream();
    // SAFETY: every byte is written below before the tensor is used (same stream).
    let mut dst: CudaSlice<T> = unsafe { dev.alloc::<T>(bytes.len() / size)? };
    let mut guard = STAGING.lock().map_err(|_| anyhow::anyhow!("weight upload buffers poisoned"))?;
    if guard.is_none() {
        *guard = Some(Staging::new(&stream)?);
    }
    let Some(staging) = guard.as_mut() else { bail!("weight upload buffers missing") };
    {
        let (base, _sync) = dst.device_ptr_mut(&stream);
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            let buf = &mut staging.bufs[staging.next];
            staging.next = (staging.next + 1) % BUFFERS;
            buf.done.synchronize()?; // the GPU has finished reading this buffer
                                     // SAFETY: the buffer is CHUNK bytes of pinned memory, not in use by the GPU (waited above).
            let host = unsafe { std::slice::from_raw_parts_mut(buf.host.as_mut_ptr()?, chunk.len()) };
            parallel_copy(chunk, host);
            // SAFETY: dst has bytes.len() bytes; this writes chunk.len() of them at offset i·CHUNK.
            unsafe { result::memcpy_htod_async(base + (i * CHUNK) as sys::CUdeviceptr, host, stream.cu_stream())? };
            buf.done.record(&stream)?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
}

impl Staging {
    fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let mut bufs = Vec::with_capacity(BUFFERS);
        for _ in 0..BUFFERS {
            // SAFETY: contents are written before every read.
            let host = unsafe { ctx.alloc_pinned::<u8>(CHUNK)? };
            let done = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
            bufs.push(Buffer { host, done });
        }
        Ok(Staging { bufs, next: 0 })
    }
}

/// memcpy with several threads: one thread cannot read the page cache at PCIe speed.
fn parallel_copy(src: &[u8], dst: &mut [u8]) {
    let part = src.len().div_ceil(THREADS).max(1 << 20);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(part).zip(src.chunks(part)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}
