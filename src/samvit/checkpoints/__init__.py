"""Weights in and out, one way down: files (errors, safe read, atomic write, sha256, key check) <- keymaps
(official <-> transformers <-> timm) <- registry (released checkpoints, verified download cache) <- load
(load_encoder, load_decoder, load_sam) <- convert (file -> file)."""
