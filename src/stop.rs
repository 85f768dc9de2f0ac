//! Stopping a run early: `--timeout` and Ctrl-C. The engine checks between batches and decode
//! steps and returns what it finished; the report then covers those samples only, with the
//! verdict `incomplete` (never a pass) and exit code 2. Stopped before any sample finished, the
//! run ends with an error and no report. Reports are written atomically either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;

/// The error a stop check returns (see `is_stop`).
#[derive(Debug)]
pub struct Stopped(pub String);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stopped {}

/// Whether an error is a stop (Ctrl-C or --timeout) rather than a failure.
pub fn is_stop(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Stopped>().is_some()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static DEADLINE: OnceLock<(Instant, Duration)> = OnceLock::new();

/// Sets the whole run's time limit (from now).
pub fn set_timeout(limit: Duration) {
    let _ = DEADLINE.set((Instant::now() + limit, limit));
}

/// Asks the run to stop at the next check (the Ctrl-C handler calls this).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails when the run was interrupted or ran past its time limit.
pub fn check() -> Result<()> {
    // Tests stop a run at a known point: GLM4_VERIFY_STOP_AFTER_CHECKS=N acts as Ctrl-C after N checks.
    let n = CHECKS.fetch_add(1, Ordering::SeqCst);
    static AFTER: OnceLock<Option<usize>> = OnceLock::new();
    let after = AFTER.get_or_init(|| std::env::var("GLM4_VERIFY_STOP_AFTER_CHECKS").ok().and_then(|v| v.parse().ok()));
    if after.is_some_and(|m| n >= m) {
        interrupt();
    }
    if interrupted() {
        return Err(Stopped("interrupted (Ctrl-C)".into()).into());
    }
    if let Some((deadline, limit)) = DEADLINE.get() {
        if Instant::now() > *deadline {
            return Err(Stopped(format!(
                "--timeout of {}s reached (raise it, or measure fewer rows with --samples N)",
                limit.as_secs()
            ))
            .into());
        }
    }
    Ok(())
}
