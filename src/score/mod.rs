//! Behaviour: teacher-forced target log-probs and greedy generations, base vs tuned.

pub mod budget;
pub mod engine;
pub mod metrics;
