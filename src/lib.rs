//! glm4-verify: did this GLM-4 LoRA adapter move the model toward its training targets?
//!
//! Stages (each a module, data in and data out): `model` and `adapter` load, `tokenizer` replays
//! the training recipe, `score` measures behaviour, `checks` diagnose causes, `verdict` concludes,
//! `report` renders.

pub mod adapter;
pub mod baseline;
pub mod checks;
pub mod compare;
pub mod data;
pub mod demo;
pub mod device;
pub mod finding;
pub mod model;
pub mod par;
pub mod pipeline;
pub mod preflight;
pub mod report;
pub mod score;
pub mod stop;
pub mod suite;
pub mod tokenizer;
pub mod verdict;
