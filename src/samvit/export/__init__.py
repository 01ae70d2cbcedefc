"""The encoder and the prompt decoder out of PyTorch: ONNX export and onnxruntime checks (onnx.py), the OpenVINO
backend (openvino.py), int8 files and encoders and their accuracy measures (int8.py). Every name is re-exported
here: `from samvit.export import export_onnx`."""
from __future__ import annotations

from .int8 import (BACKENDS, Int8Encoder, cosine, export_onnx_int8, grid_prompts, mask_agreement,
                   quantize_onnx_int8, summarise, torch_dynamic_int8)
from .onnx import (DECODER_INPUTS, DECODER_OUTPUTS, DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, INPUT_NAME, MIN_OPSET,
                   OUTPUT_NAME, compare, export_decoder_onnx, export_onnx, needs_external_data, onnx_session,
                   parameter_bytes, verify_decoder_onnx, verify_onnx)
from .openvino import OpenVINOEncoder

__all__ = ["BACKENDS", "DECODER_INPUTS", "DECODER_OUTPUTS", "DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "INPUT_NAME",
           "Int8Encoder", "MIN_OPSET", "OUTPUT_NAME", "OpenVINOEncoder", "compare", "cosine", "export_decoder_onnx",
           "export_onnx", "export_onnx_int8", "grid_prompts", "mask_agreement", "needs_external_data",
           "onnx_session", "parameter_bytes", "quantize_onnx_int8", "summarise", "torch_dynamic_int8",
           "verify_decoder_onnx", "verify_onnx"]
