"""lad: Label Assignment Distillation for PAA detectors."""

__version__ = "0.1.0"
