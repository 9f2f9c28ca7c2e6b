"""A trained detector to ONNX (``lad export``), and the exported graph run by onnxruntime.

The graph holds the network, box decoding and the PAA score; its per-anchor outputs feed the same
post-processing as the PyTorch model (``lad_pipeline.postprocess.postprocess_decoded``).
"""
from .exporter import ExportReport, export_onnx
from .graph import DeployedDetector
from .runtime import OnnxDetector

__all__ = ["DeployedDetector", "ExportReport", "OnnxDetector", "export_onnx"]
