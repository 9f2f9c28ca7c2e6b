"""Swin weights from elsewhere, under our names: mmdetection detectors and the two ImageNet layouts.

* mmdetection's SwinTransformer nests the attention in ``attn.w_msa`` and the MLP in mmcv's FFN
  (``ffn.layers.0.0`` / ``ffn.layers.1``); ours are ``attn`` and ``mlp.fc1`` / ``mlp.fc2``.
* The original Swin release (``layers.{i}.blocks.{j}...``, ``{"model": ...}``) and torchvision's
  ``swin_t/s/b`` (``features.{k}...``) gather each 2x2 neighbourhood of the patch merging as
  [(0,0), (1,0), (0,1), (1,1)] (row, column) blocks of C channels; ours (mmdetection's nn.Unfold order) is
  channel-major with (0,0), (0,1), (1,0), (1,1) inside, so the merging's norm and reduction are permuted,
  as mmdetection's ``swin_converter`` does. Their classifier (``norm``, ``head``), the release's ``attn_mask``
  buffers and the position indices (recomputed, torchvision stores them flattened) are not read; the
  detector's output norms (``norm1``..``norm3``) are not in an ImageNet file and keep their initial values.
"""
from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

# mmdetection name -> ours (applied to every key of a detector checkpoint)
MMDET_SWIN_RENAMES = [
    (re.compile(r"^(backbone\.stages\.\d+\.blocks\.\d+\.attn)\.w_msa\."), r"\1."),
    (re.compile(r"^(backbone\.stages\.\d+\.blocks\.\d+)\.ffn\.layers\.0\.0\."), r"\1.mlp.fc1."),
    (re.compile(r"^(backbone\.stages\.\d+\.blocks\.\d+)\.ffn\.layers\.1\."), r"\1.mlp.fc2."),
]

# backbone keys an ImageNet file does not hold: the detector's output norms and the computed indices
IMAGENET_ABSENT = re.compile(r"^norm\d\.|\.relative_position_index$")
_ORIGINAL_KEY = "patch_embed.proj.weight"
_TORCHVISION_KEY = "features.0.0.weight"


def imagenet_swin_layout(state: Mapping[str, Tensor]) -> str | None:
    """``"original"`` (the Swin release), ``"torchvision"``, or None when ``state`` is neither."""
    if _ORIGINAL_KEY in state and any(k.startswith("layers.") for k in state):
        return "original"
    if _TORCHVISION_KEY in state and "features.1.0.attn.qkv.weight" in state:
        return "torchvision"
    return None


def _unfold_order(x: Tensor) -> Tensor:
    """A tensor over the merged 4C inputs (last axis) from [(0,0), (1,0), (0,1), (1,1)] blocks to ours."""
    blocks = x.reshape(*x.shape[:-1], 4, x.shape[-1] // 4)[..., [0, 2, 1, 3], :]
    return blocks.transpose(-1, -2).reshape(x.shape)


def _rename(key: str, layout: str) -> str:
    """An ImageNet key -> our backbone's name; unknown keys come back unchanged (the loader names them)."""
    if layout == "original":
        key = key.replace("patch_embed.proj.", "patch_embed.projection.", 1)
        return re.sub(r"^layers\.", "stages.", key)
    match = re.match(r"^features\.(\d+)\.(.*)$", key)
    if not match:
        return key
    index, rest = int(match[1]), match[2]
    if index == 0:
        return {"0.": "patch_embed.projection.", "2.": "patch_embed.norm."}.get(rest[:2], "features.0.") + rest[2:]
    if index % 2 == 0:
        return f"stages.{index // 2 - 1}.downsample.{rest}"
    rest = re.sub(r"^(\d+)\.mlp\.0\.", r"\1.mlp.fc1.", rest)
    rest = re.sub(r"^(\d+)\.mlp\.3\.", r"\1.mlp.fc2.", rest)
    return f"stages.{(index - 1) // 2}.blocks.{rest}"


def convert_imagenet_swin(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """An ImageNet Swin state dict (``layout`` from ``imagenet_swin_layout``) as our SwinBody's keys."""
    out = {}
    for key, value in state.items():
        if key.startswith(("norm.", "head.")) or key.endswith((".attn_mask", ".relative_position_index")):
            continue  # the classifier, and buffers that are recomputed
        name = _rename(key, layout)
        if re.search(r"\.downsample\.(reduction\.weight|norm\.(weight|bias))$", name):
            value = _unfold_order(value)
        out[name] = value
    return out
