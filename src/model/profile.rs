//! Opt-in timings (GLM4_VERIFY_PROFILE): `1` times forward-pass sections, each synchronising the
//! device before and after (so the numbers are device time), and marks; `marks` only marks the
//! wall-clock time since the process started at points of a run (no synchronisation, so the run
//! keeps its speed); `events` (CUDA) times each section between two CUDA events recorded around
//! it, without synchronising: a section's own device time while the device runs as in a plain run,
//! where `1`'s numbers carry each section's launch and synchronisation (an upper bound, far off for
//! the small kernels of a decode step). Printed to stderr at the end of a run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

const OFF: u8 = 0;
const SECTIONS: u8 = 1;
const MARKS: u8 = 3;
const EVENTS: u8 = 4;
static MODE: AtomicU8 = AtomicU8::new(2); // 2 = not read yet
/// (phase, section) → (seconds, calls)
type Totals = BTreeMap<(&'static str, &'static str), (f64, u64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());
static PHASE: Mutex<&'static str> = Mutex::new("");
static START: OnceLock<Instant> = OnceLock::new();
/// (name, seconds since start, the CUDA memory pool's bytes in use and reserved then)
type Mark = (&'static str, f64, Option<(u64, u64)>);
static MARKS_AT: Mutex<Vec<Mark>> = Mutex::new(Vec::new());

fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        2 => {
            let m = match std::env::var("GLM4_VERIFY_PROFILE").as_deref() {
                Ok("marks") => MARKS,
                Ok("events") => EVENTS,
                Ok("" | "0") | Err(_) => OFF,
                Ok(_) => SECTIONS,
            };
            MODE.store(m, Ordering::Relaxed);
            m
        }
        m => m,
    }
}

/// Names the phase that following sections count under (e.g. scoring vs decoding).
pub fn phase(name: &'static str) {
    if enabled() {
        if let Ok(mut p) = PHASE.lock() {
            *p = name;
        }
    }
}

/// Whether sections are timed (GLM4_VERIFY_PROFILE=1 or events).
pub fn enabled() -> bool {
    matches!(mode(), SECTIONS | EVENTS)
}

/// Records the wall-clock time since the process started (the first mark) at a named point.
pub fn mark(name: &'static str) {
    push_mark(name, None);
}

/// As `mark`, with the CUDA memory pool's bytes in use and reserved at that point (as the host
/// has queued the work: allocations are made when queued). Shows where a run's reserve grows.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn mark_memory(name: &'static str, device: &Device) {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(c), false) = (device, mode() == OFF) {
        return push_mark(name, crate::device::pool::current(c));
    }
    push_mark(name, None)
}

fn push_mark(name: &'static str, memory: Option<(u64, u64)>) {
    if mode() == OFF {
        return;
    }
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    if let Ok(mut m) = MARKS_AT.lock() {
        m.push((name, t, memory));
    }
}

/// Adds host wall-clock time to `name` (marks mode too: no synchronisation of its own), e.g. the
/// time spent queueing a decode step against the time waiting for its result.
pub fn tally(name: &'static str, seconds: f64) {
    if mode() == OFF {
        return;
    }
    if let Ok(mut m) = TOTALS.lock() {
        let e = m.entry(("host", name)).or_insert((0.0, 0));
        e.0 += seconds;
        e.1 += 1;
    }
}

/// Runs `f`, adding its device time to `name` when profiling is on.
pub fn section<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    let phase = PHASE.lock().map(|p| *p).unwrap_or("");
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(c), EVENTS) = (device, mode()) {
        return events::section(phase, name, c, f);
    }
    device.synchronize()?;
    let t = Instant::now();
    let r = f()?;
    device.synchronize()?;
    add(phase, name, t.elapsed().as_secs_f64());
    Ok(r)
}

fn add(phase: &'static str, name: &'static str, seconds: f64) {
    if let Ok(mut m) = TOTALS.lock() {
        let e = m.entry((phase, name)).or_insert((0.0, 0));
        e.0 += seconds;
        e.1 += 1;
    }
}

/// Sections timed by CUDA events (GLM4_VERIFY_PROFILE=events): each section's events are kept until
/// a few thousand are pending, then read (which waits for the device) and freed.
#[cfg(feature = "cuda")]
mod events {
    use std::sync::Mutex;

    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
    use candle_core::CudaDevice;

    type Timed = (&'static str, &'static str, CudaEvent, CudaEvent);
    static PENDING: Mutex<Vec<Timed>> = Mutex::new(Vec::new());
    const READ_AT: usize = 4096;

    pub fn section<T>(
        phase: &'static str,
        name: &'static str,
        c: &CudaDevice,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let stream = c.cuda_stream();
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timed)?;
        let r = f()?;
        let end = stream.record_event(timed)?;
        let full = PENDING.lock().map(|mut p| {
            p.push((phase, name, start, end));
            p.len() >= READ_AT
        });
        if full.unwrap_or(false) {
            read();
        }
        Ok(r)
    }

    /// Adds the pending sections' times to the totals.
    pub fn read() {
        let Ok(mut p) = PENDING.lock() else { return };
        for (phase, name, start, end) in p.drain(..) {
            if let Ok(ms) = start.elapsed_ms(&end) {
                super::add(phase, name, ms as f64 / 1e3);
            }
        }
    }
}

/// The table of sections (seconds, calls) and the marks, when profiling is on.
pub fn report() -> Option<String> {
    if mode() == OFF {
        return None;
    }
    #[cfg(feature = "cuda")]
    events::read();
    let mut s = String::new();
    {
        let m = TOTALS.lock().ok()?;
        let total: f64 = m.iter().filter(|(k, _)| k.0 != "host").map(|(_, v)| v.0).sum();
        let how = if mode() == EVENTS {
            "between CUDA events, unsynchronised (on the CPU: synchronised)"
        } else {
            "synchronised per section"
        };
        s.push_str(&format!("profile (device time, {how}; total {total:.2}s; host: wall-clock)\n"));
        for ((phase, k), (t, n)) in m.iter() {
            let k = format!("{phase} {k}");
            let share = if *phase == "host" { String::new() } else { format!("{:.1}%", 100.0 * t / total.max(1e-9)) };
            s.push_str(&format!("  {k:<30} {t:>8.3}s {share:>6} {n:>8} calls\n"));
        }
    }
    s.push_str("marks (wall-clock seconds since the process started)\n");
    for (name, t, memory) in MARKS_AT.lock().ok()?.iter() {
        match memory {
            Some((used, reserved)) => s.push_str(&format!(
                "  {t:>8.3}s  {name}  (pool: {:.3} GB in use, {:.3} GB reserved)\n",
                *used as f64 / 1e9,
                *reserved as f64 / 1e9
            )),
            None => s.push_str(&format!("  {t:>8.3}s  {name}\n")),
        }
    }
    Some(s)
}
