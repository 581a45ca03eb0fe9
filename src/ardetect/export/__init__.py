"""The trained detector as ONNX graphs: export, run on onnxruntime, parity, registry."""

from ardetect.export.onnx_export import ExportError, export_detector
from ardetect.export.runtime import OnnxARDMethod, OnnxDetector, prepare_image

__all__ = ["ExportError", "OnnxARDMethod", "OnnxDetector", "export_detector", "prepare_image"]
