//! Writing a loaded model in other formats than an HF folder (which `model::convert` writes).
//! - [`gguf`]: a GGUF v3 file for llama.cpp and Ollama, with llama.cpp's quantization presets.
pub mod gguf;
