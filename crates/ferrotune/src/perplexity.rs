//! perplexity (to be written)
