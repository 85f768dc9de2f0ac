//! Placeholder until the converter lands.
use std::path::Path;
pub fn load_tiktoken(model_path: &Path, _tokenizer_config: Option<&Path>) -> anyhow::Result<tokenizers::Tokenizer> {
    anyhow::bail!("{}: tiktoken tokenizer.model is not supported yet", model_path.display())
}
