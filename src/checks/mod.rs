//! Static diagnostics, one file per subject. Each returns `Finding`s (values, not log lines).

pub mod adapter;
pub mod data_format;
pub mod hardware;
pub mod labels;
pub mod train;
