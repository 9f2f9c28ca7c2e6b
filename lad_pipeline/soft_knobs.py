"""What a soft-label record keeps (``lad cache-labels --soft``): the knobs, their checks and their form in a
label cache's attributes. Plain Python, so that the command line can show the defaults without loading torch."""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from .errors import LadError

CODE_BITS = (4, 8)  # per-anchor background codes: two per byte, or one


class SoftKnobs(NamedTuple):
    """What a soft record keeps. Defaults: a COCO view at (1333, 800) stays within ~16 KB on disk.

    ``floor``: anchors whose top teacher probability reaches it are stored, with every class whose
    probability reaches it (at least the top one, at most ``top_k``, largest first);
    ``max_confident``: at most that many stored anchors besides the box-KD ones (the most confident);
    ``min_iou``: box-KD selection threshold (encode at the lowest one a consumer needs: SoLAD 0.5, KD 0.1);
    ``bg_rank``: principal directions of the background model (0: a per-level, per-class mean only);
    ``bg_bits``: bits of each per-anchor code (4 or 8).
    """

    floor: float = 0.02
    top_k: int = 8
    max_confident: int = 500
    min_iou: float = 0.5
    bg_rank: int = 1
    bg_bits: int = 4

    def validate(self, num_classes: Optional[int] = None) -> "SoftKnobs":
        """The knobs, or a LadError naming the bad one."""
        checks = (
            ("floor", 0.0 <= self.floor <= 1.0, "a probability in [0, 1]"),
            ("top_k", isinstance(self.top_k, int) and 1 <= self.top_k <= (num_classes or 256),
             f"an integer in 1..{num_classes or 256}"),
            ("max_confident", isinstance(self.max_confident, int) and self.max_confident >= 0,
             "a non-negative integer"),
            ("min_iou", 0.0 <= self.min_iou < 1.0, "in [0, 1)"),
            ("bg_rank", isinstance(self.bg_rank, int) and 0 <= self.bg_rank <= 8, "an integer in 0..8"),
            ("bg_bits", self.bg_bits in CODE_BITS, "4 or 8"),
        )
        for name, ok, what in checks:
            if not ok:
                raise LadError(f"soft-label knob {name} must be {what}, got {getattr(self, name)!r}")
        return self

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready dict, as a label cache records it (``attrs["soft"]``)."""
        return {"floor": float(self.floor), "top_k": int(self.top_k), "max_confident": int(self.max_confident),
                "min_iou": float(self.min_iou), "bg_rank": int(self.bg_rank), "bg_bits": int(self.bg_bits)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "SoftKnobs":
        """The knobs of ``to_attrs`` (other keys are ignored)."""
        missing = [k for k in cls._fields if k not in attrs]
        if missing:
            raise LadError(f"soft-label attributes lack {', '.join(missing)}; rebuild the label cache")
        return cls(float(attrs["floor"]), int(attrs["top_k"]), int(attrs["max_confident"]),
                   float(attrs["min_iou"]), int(attrs["bg_rank"]), int(attrs["bg_bits"]))
