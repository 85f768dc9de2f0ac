//! Opt-in stage timings for the forward pass (GLM4_VERIFY_PROFILE=1): each section synchronises
//! the device before and after, so the numbers are device time; printed to stderr at the end of a run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

static ENABLED: AtomicU8 = AtomicU8::new(2); // 2 = not read yet
/// (phase, section) → (seconds, calls)
type Totals = BTreeMap<(&'static str, &'static str), (f64, u64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());
static PHASE: Mutex<&'static str> = Mutex::new("");

/// Names the phase that following sections count under (e.g. scoring vs decoding).
pub fn phase(name: &'static str) {
    if enabled() {
        if let Ok(mut p) = PHASE.lock() {
            *p = name;
        }
    }
}

pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        2 => {
            let on = std::env::var_os("GLM4_VERIFY_PROFILE").is_some_and(|v| v != "0");
            ENABLED.store(on as u8, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Runs `f`, adding its device time to `name` when profiling is on.
pub fn section<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let r = f()?;
    device.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    let phase = PHASE.lock().map(|p| *p).unwrap_or("");
    if let Ok(mut m) = TOTALS.lock() {
        let e = m.entry((phase, name)).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
    Ok(r)
}

/// The table of sections (seconds, calls), when profiling is on.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let m = TOTALS.lock().ok()?;
    let total: f64 = m.values().map(|v| v.0).sum();
    let mut s = format!("profile (device time, synchronised per section; total {total:.2}s)\n");
    for ((phase, k), (t, n)) in m.iter() {
        let k = format!("{phase} {k}");
        s.push_str(&format!("  {k:<30} {t:>8.3}s {:>5.1}% {n:>8} calls\n", 100.0 * t / total.max(1e-9)));
    }
    Some(s)
}
