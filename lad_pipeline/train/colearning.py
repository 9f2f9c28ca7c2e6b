"""CoLAD: two detectors that teach each other (co-learning label assignment distillation).

The student of the loop is network 1; network 2 is a *peer* of this label source: the loop trains it with
the same optimizer, wraps it in DDP and checkpoints it, and hands its outputs on the same batch to
``labels``. For every (GT, FPN level) the network whose PAA candidate losses separate better (std / mean)
chooses the candidates' losses, one GMM split follows, and that one assignment trains both networks with
the LAD losses; network 2's terms carry the suffix ``_t``. The two heads may differ (PAA and COP, say):
each network's outputs are read through its own anchor layout. ``docs/colad.md`` has the algorithm and where
we differ from the authors' code.
"""
from __future__ import annotations

from torch import nn

from ..assign import colad_assign
from ..config import AssignConfig, LossConfig
from ..errors import LadError
from ..models import PAADetector
from ..models.anchors import AnchorLayout
from ..types import HeadOutputs
from .label_sources import Labels, LabelSource, StepInputs, detached
from .objectives import CoLADLoss, LADLoss

PEER = "colad"  # the peer's name in checkpoints and StepInputs.peer_outs


class CoLearning(LabelSource):
    """Labels chosen jointly by the student (network 1) and ``network2``; the loss trains both."""

    def __init__(self, network2: PAADetector, assign: AssignConfig, loss: LossConfig, anchors: AnchorLayout) -> None:
        super().__init__(loss, anchors)
        differs = anchors.differences(network2.anchors)
        if differs:  # one assignment trains both: both networks must share their anchors
            raise LadError(f"CoLAD needs one anchor layout for both networks: colad.model differs from model in "
                           f"{', '.join(differs)}")
        self.network2 = network2
        self.config = assign
        self.objective = CoLADLoss(LADLoss(anchors, loss), LADLoss(network2.anchors, loss))

    def peers(self) -> dict[str, nn.Module]:
        return {PEER: self.network2}

    def labels(self, batch: StepInputs, outs: HeadOutputs) -> Labels:
        outs2 = batch.peer_outs[PEER]
        assignments, stats = colad_assign(detached(outs), detached(outs2), batch.targets, batch.pad_shapes,
                                          anchors=self.anchors, anchors2=self.network2.anchors, config=self.config,
                                          loss=self.loss_config)
        return Labels(assignments, batch.targets, peer=outs2,
                      stats={"t_ratio": (float(stats.t_won), float(stats.t_total))})
