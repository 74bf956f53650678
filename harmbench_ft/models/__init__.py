"""Models: loading (aliases, GGUF conversion, hub), tiny in-process models, and architecture-generic layer lookup."""
