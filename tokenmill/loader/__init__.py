"""Model loading: GGUF files, Hugging Face folders, dummy weights, and the bundled default."""
