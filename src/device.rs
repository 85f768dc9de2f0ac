//! `--device` and `--dtype`: pick where and in which precision the model runs.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};

use crate::checks::hardware::DeviceInfo;

/// auto | cpu | cuda | cuda:N
pub fn select(arg: &str) -> Result<Device> {
    let d = pick(arg)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // SAFETY: everything runs on the device's one stream, where frees and uses are ordered
        // anyway; per-tensor event tracking only adds driver calls to every kernel launch.
        unsafe { c.disable_event_tracking() };
        pool::keep_freed_memory(c);
        pool::reset_peaks(c);
    }
    Ok(d)
}

/// GPU memory held by this process's tensors, in bytes: (in use now, most in use, most reserved from
/// the driver, the CUDA context and libraries not counted); None on CPU.
#[allow(unused_variables)]
pub fn gpu_memory(device: &Device) -> Option<(u64, u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = device {
        return pool::usage(c);
    }
    None
}

/// The GPU's memory in bytes; None on CPU.
#[allow(unused_variables)]
pub fn gpu_total_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = device {
        return pool::total(c);
    }
    None
}

/// Hands the CUDA memory pool's unused memory back to the driver (no-op on CPU). Called when a
/// run's transient tensors are all freed (a decode group done), so that the next group's
/// allocations map fresh memory instead of fitting into the pieces the last group left: the pool
/// does not join free memory across the pieces it mapped, and on the 9B benchmark under
/// `--gpu-memory 21.67GB` its reserve grew by up to 0.7 GB over five groups without this
/// (their tensors in use the same each time).
#[allow(unused_variables)]
pub fn release_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = device {
        pool::release_freed_memory(c);
    }
}

/// The CUDA memory pool that candle's allocations come from (cuMemAllocAsync on the default pool).
#[cfg(feature = "cuda")]
pub mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    fn default_pool(c: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let ctx = c.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out pointer.
        let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    /// By default the pool hands freed memory back to the driver at every synchronisation (each
    /// batch's read-back, each decode step), and the next allocations map it again: keep it.
    pub fn keep_freed_memory(c: &CudaDevice) {
        if let Some(pool) = default_pool(c) {
            let mut keep = u64::MAX;
            // SAFETY: the release threshold attribute takes a u64.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                )
            };
        }
    }

    /// Starts the pool's high-water marks afresh (the only value they can be set to is 0).
    pub fn reset_peaks(c: &CudaDevice) {
        if let Some(pool) = default_pool(c) {
            for attr in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero = 0u64;
                // SAFETY: these attributes take a u64.
                unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut zero as *mut u64 as *mut std::ffi::c_void) };
            }
        }
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v = 0u64;
        // SAFETY: the attributes read here are u64.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// Bytes of the pool's memory: (in use now, most in use, most reserved from the driver).
    pub fn usage(c: &CudaDevice) -> Option<(u64, u64, u64)> {
        let pool = default_pool(c)?;
        use sys::CUmemPool_attribute as A;
        Some((
            attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            attribute(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        ))
    }

    /// Bytes of the pool's memory now: (in use, reserved from the driver).
    pub fn current(c: &CudaDevice) -> Option<(u64, u64)> {
        let pool = default_pool(c)?;
        use sys::CUmemPool_attribute as A;
        Some((
            attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            attribute(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        ))
    }

    /// The device's memory, bytes.
    pub fn total(c: &CudaDevice) -> Option<u64> {
        let ctx = c.cuda_stream().context().clone();
        let mut bytes = 0usize;
        // SAFETY: a valid device handle and an out pointer.
        let r = unsafe { sys::cuDeviceTotalMem_v2(&mut bytes, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && bytes > 0).then_some(bytes as u64)
    }

    /// Hands the pool's unused memory back (before retrying after running out of memory).
    pub fn release_freed_memory(c: &CudaDevice) {
        if let Some(pool) = default_pool(c) {
            let _ = candle_core::backend::BackendDevice::synchronize(c);
            // SAFETY: a valid pool.
            unsafe { sys::cuMemPoolTrimTo(pool, 0) };
        }
    }
}

fn pick(arg: &str) -> Result<Device> {
    match arg {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| anyhow!("--device {s}: expected cuda:N with N a GPU index"))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device {s}: this glm4-verify was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu"
                );
            }
            Device::new_cuda(n).map_err(|e| {
                anyhow!("--device {s}: no usable CUDA GPU {n} ({e}); check nvidia-smi, or use --device cpu")
            })
        }
        other => bail!("--device {other}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// Name and compute capability of a device.
pub fn info(device: &Device) -> DeviceInfo {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let ctx = d.cuda_stream().context().clone();
            DeviceInfo {
                name: ctx.name().unwrap_or_else(|_| "CUDA GPU".into()),
                compute_capability: ctx.compute_capability().ok().map(|(a, b)| (a as u32, b as u32)),
                is_cuda: true,
            }
        }
        _ => DeviceInfo { name: "cpu".into(), compute_capability: None, is_cuda: false },
    }
}

/// auto | f32 | bf16 | f16. auto: bf16 on a GPU that has it (compute capability ≥ 8.0), f16 on
/// older GPUs, f32 on CPU.
pub fn dtype(arg: &str, device: &DeviceInfo) -> Result<DType> {
    Ok(match arg {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "auto" if device.is_cuda => match device.compute_capability {
            Some((major, _)) if major < 8 => DType::F16,
            _ => DType::BF16,
        },
        "auto" => DType::F32,
        other => bail!("--dtype {other}: expected auto, f32, bf16 or f16"),
    })
}

/// `--dtype auto` on the CPU: f32, unless the weights in f32 (`f32_bytes`) would take more than 80%
/// of the available memory; then the checkpoint's own 16-bit dtype, so that the model needs no more
/// memory than its files (a 9B bf16 checkpoint is 18.8 GB, 37.6 GB in f32). Returns why when not f32.
pub fn cpu_auto_dtype(checkpoint: DType, f32_bytes: usize, available: Option<usize>) -> (DType, Option<String>) {
    let gb = |b: usize| b as f64 / 1e9;
    match (checkpoint, available) {
        (DType::BF16 | DType::F16, Some(avail)) if f32_bytes as f64 > 0.8 * avail as f64 => (
            checkpoint,
            Some(format!(
                "the weights need {:.1} GB in f32 and {:.1} GB of memory are available: running in {} (the checkpoint's dtype), which needs half; pass --dtype f32 to force f32",
                gb(f32_bytes),
                gb(avail),
                dtype_name(checkpoint)
            )),
        ),
        _ => (DType::F32, None),
    }
}

/// MemAvailable from /proc/meminfo (Linux), in bytes.
pub fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Free and total memory of a CUDA device, in words (for out-of-memory messages).
pub fn memory_summary(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info() {
            let gb = |b: usize| b as f64 / 1e9;
            return format!("{:.1} GB free of {:.1} GB on the GPU", gb(free), gb(total));
        }
    }
    match device {
        Device::Cpu => "on the CPU".into(),
        _ => "device memory unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_auto_dtype_keeps_a_big_bf16_checkpoint_in_bf16() {
        // 9.4 B parameters: 37.7 GB in f32.
        let f32_bytes = 9_400_000_000 * 4;
        let (d, why) = cpu_auto_dtype(DType::BF16, f32_bytes, Some(32_000_000_000));
        assert_eq!(d, DType::BF16);
        assert!(why.unwrap().contains("37.6 GB in f32"));
        assert_eq!(cpu_auto_dtype(DType::BF16, f32_bytes, Some(128_000_000_000)), (DType::F32, None));
        // An f32 checkpoint, or unknown memory: f32.
        assert_eq!(cpu_auto_dtype(DType::F32, f32_bytes, Some(1_000_000_000)).0, DType::F32);
        assert_eq!(cpu_auto_dtype(DType::BF16, f32_bytes, None).0, DType::F32);
    }
}
