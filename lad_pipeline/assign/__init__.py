"""Label assignment: max-IoU pre-assignment, PAA scores, per-level top-k, GMM split; CoLAD's two-network choice."""
from .colad import CoLADStats, colad_assign
from .gmm import GMMFit, fit_gmm, fit_gmm_sklearn, split_positives
from .max_iou import max_iou_assign
from .paa import paa_assign

__all__ = ["CoLADStats", "GMMFit", "colad_assign", "fit_gmm", "fit_gmm_sklearn", "max_iou_assign",
           "paa_assign", "split_positives"]
