"""Decoding and the geometric transforms of one view, following mmdetection 3.3.0's training pipeline.

``LoadImageFromFile -> Resize(scale, keep_ratio=True) -> RandomFlip``. Normalisation and padding are not
here: they run on the device, batched (``collate.normalize_and_pad``).

Differences from mmdetection, all within rounding:
* mmcv resizes with OpenCV's INTER_LINEAR, whose uint8 path uses 11-bit fixed-point weights; we use
  torchvision's bilinear resize of the uint8 image with ``antialias=False`` (no cv2 here). Both sample at
  half-pixel centres without antialiasing; pixel values may differ by 1.
* Images are decoded by torchvision (libjpeg / libpng) and turned upright by their EXIF orientation tag, as
  mmdetection's ``LoadImageFromFile`` (mmcv / OpenCV ``IMREAD_COLOR``) and detectron2's ``read_image`` do:
  annotations of such a file are in the upright frame, the one viewers and annotation tools show.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode

from ..errors import LadError
from ..types import Targets, ViewKey


@contextmanager
def quiet_torchvision_io():
    """torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec, which is not a dependency
    here; the codecs work, so their per-call DeprecationWarning is silenced where we call them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


@dataclass
class View:
    """One view of one image, ready for batching.

    ``image`` uint8 ``[3, h, w]`` RGB, not normalised (its memory may be channels-last, as decoded);
    ``targets`` in view pixels; ``orig_size``/``view_size`` are (H, W); ``scale_factor`` is
    (w_scale, h_scale) = (new_w / W, new_h / H), mmdetection's ``scale_factor``.
    """

    image: Tensor
    targets: Targets
    key: ViewKey
    orig_size: tuple[int, int]
    view_size: tuple[int, int]
    scale_factor: tuple[float, float]
    flip: bool


def keep_ratio_size(size: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) an image of ``size`` (h, w) gets when resized to ``scale`` keeping its aspect ratio.

    mmcv's ``rescale_size``: factor = min(long / max(h, w), short / min(h, w)), each side
    ``int(side * factor + 0.5)`` (halves round up, unlike Python's ``round``).
    """
    h, w = size
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def read_image(path: Path, exif_orientation: bool = True) -> Tensor:
    """Decode a JPEG or PNG file into uint8 ``[3, H, W]`` RGB (grayscale, palette, alpha and CMYK
    converted by the decoder; 16-bit PNG reduced to 8 bits), turned upright by its EXIF orientation tag
    unless ``exif_orientation`` is False. Raises LadError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LadError(f"image {path} is listed in the annotations but missing on disk") from None
    except OSError as exc:
        raise LadError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise LadError(f"cannot decode image {path}: the file is empty")
    try:
        with quiet_torchvision_io():
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=exif_orientation)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LadError(f"cannot decode image {path}: {reason}") from None
    if image.dtype == torch.uint16:  # 16-bit PNG: keep the high byte (OpenCV rounds x / 256: within 1)
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a uint8 ``[3, H, W]`` image to ``size`` (h, w), without antialiasing (cv2-like)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)


def hflip_image(image: Tensor) -> Tensor:
    # index_select over the width of the (usually channels-last) image is several times faster than flip()
    index = torch.arange(image.shape[-1] - 1, -1, -1)
    return image.index_select(-1, index)


def rescale_boxes(boxes: Tensor, w_scale: float, h_scale: float, size: tuple[int, int]) -> Tensor:
    """Scale x by ``w_scale`` and y by ``h_scale`` (float32, as mmdetection), then clip to ``size`` (h, w)."""
    factors = torch.tensor([w_scale, h_scale, w_scale, h_scale], dtype=torch.float32)
    out = boxes.to(torch.float32) * factors
    h, w = size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror x1y1x2y2 boxes in an image ``width`` wide: x1' = W - x2, x2' = W - x1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def make_view(image: Tensor, targets: Targets, key: ViewKey) -> View:
    """The view ``key`` of a decoded image with its targets in original pixels: resize, clip, flip."""
    orig = (int(image.shape[-2]), int(image.shape[-1]))
    size = keep_ratio_size(orig, key.scale)
    if min(size) < 1:
        raise LadError(f"image {key.image_id} ({orig[1]}x{orig[0]} pixels) resizes to {size[1]}x{size[0]} at scale "
                       f"{key.scale}: too thin to use")
    image = resize_image(image, size)
    # mmdetection scales boxes by the realised per-axis factors, not by the nominal keep-ratio factor
    w_scale, h_scale = size[1] / orig[1], size[0] / orig[0]
    boxes = rescale_boxes(targets.boxes, w_scale, h_scale, size)
    ignore = None if targets.ignore is None else rescale_boxes(targets.ignore, w_scale, h_scale, size)
    if key.flip:
        image = hflip_image(image)
        boxes = hflip_boxes(boxes, size[1])
        ignore = None if ignore is None else hflip_boxes(ignore, size[1])
    return View(image=image, targets=Targets(boxes, targets.labels.clone(), ignore), key=key, orig_size=orig,
                view_size=size, scale_factor=(w_scale, h_scale), flip=bool(key.flip))
