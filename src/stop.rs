//! Stopping a run early: `--timeout` and Ctrl-C. The engine checks between batches and decode
//! steps; a stopped run ends with an error (exit 2), so no verdict — never a pass — and, since
//! reports are written atomically, no half-written report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
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
    if interrupted() {
        bail!("interrupted (Ctrl-C): the run is incomplete, no verdict and no report were written");
    }
    if let Some((deadline, limit)) = DEADLINE.get() {
        if Instant::now() > *deadline {
            bail!(
                "--timeout of {}s reached: the run is incomplete, no verdict and no report were written; raise --timeout or use --samples N",
                limit.as_secs()
            );
        }
    }
    Ok(())
}
