"""The device model for deployment: ONNX export, int8 quantisation, an ONNX Runtime runner."""

from coevo.export.onnx import DeviceScorer, ExportError, to_onnx
from coevo.export.quantize import quantize_int8
from coevo.export.runner import OnnxScorer, parity

__all__ = ["DeviceScorer", "ExportError", "OnnxScorer", "parity", "quantize_int8", "to_onnx"]
