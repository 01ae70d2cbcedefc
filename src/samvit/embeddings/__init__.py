"""The encoder's output on disk: files (one .safetensors per image), store (EmbeddingStore), pipeline (the one
embed loop: workers, batches, tiles, resume, torchrun ranks; output to a sink)."""
