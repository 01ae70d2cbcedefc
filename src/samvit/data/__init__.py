"""Image -> model input, and model output -> image pixels: sources (files, dirs, globs, lists), images (decoding
and the conversion rule), preprocess (both directions), tiles."""
