"""Embedding + prompts -> masks: prompts (validation), predictor, automatic (grid prompts, MaskData), draw."""
