"""PAA detector: backbone, FPN, head, anchors and box coder."""
from .detector import PAADetector, build_detector

__all__ = ["PAADetector", "build_detector"]
