"""A COCO instances dataset whose items are views addressed by ViewKey.

Annotations are parsed once, vectorised, into flat arrays (cheap to send to DataLoader workers); the
rules follow mmdetection 3.3.0's ``CocoDataset``: categories map to contiguous labels in ascending id
order; a box is dropped when it does not overlap its image, is narrower or shorter than 1 px, or has
``area <= 0``; crowd boxes become ``Targets.ignore``; boxes are clipped to the image after resizing.
For training, images smaller than 32 px on a side are skipped (mmdetection's ``min_size=32``), and so
are images without a (valid, non-crowd) box; mmdetection's ``filter_empty_gt`` would keep an image that
has only crowd boxes. For evaluation every image is kept.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..errors import LadError
from ..types import Targets, ViewKey
from .sampling import check_scale_mode, draw_train_keys, variant_keys
from .transforms import View, make_view, read_image

log = logging.getLogger("lad")

MIN_TRAIN_IMAGE_SIDE = 32


class BadImageError(LadError):
    """An image file that cannot be used (missing, undecodable, or not the size the annotations say)."""


def load_coco_json(ann_file: Union[str, Path]) -> dict[str, Any]:
    """Read and check a COCO instances file; every problem is a LadError naming the file."""
    path = Path(ann_file)
    if not path.is_file():
        raise LadError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LadError(f"annotation file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LadError(f"annotation file {path} is not a COCO instances file: the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise LadError(f"annotation file {path} is not a COCO instances file: it has no '{key}' list")
    required = {"images": ("id", "file_name", "width", "height"), "categories": ("id", "name"),
                "annotations": ("id", "image_id", "category_id", "bbox")}
    for what, keys in required.items():
        for n, item in enumerate(data[what]):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise LadError(f"annotation file {path} is not a COCO instances file: {what}[{n}] lacks "
                               f"'{missing[0]}'")
    return data


def _csr(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Offsets of row-sorted items: row r owns ``[offsets[r], offsets[r+1])``."""
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))]).astype(np.int64)


class CocoViews(Dataset):
    """COCO images as views: ``dataset[ViewKey]`` is a ``View`` (resized, maybe flipped, boxes in view pixels).

    ``scales``: (long, short) target scales; ``scale_mode``: how training views take them ("list": one of
    them; "range": sides drawn between the two, ``draw_train_keys``); ``flip_prob``: training-time
    horizontal flip (default 0.5 when ``train`` else 0). With ``skip_bad_images`` an unusable image file
    yields ``None`` (``collate_views`` drops and counts it) instead of raising.
    """

    def __init__(self, ann_file: Union[str, Path], image_dir: Union[str, Path], *,
                 scales: Sequence[Sequence[int]] = ((1333, 800),), flip_prob: Optional[float] = None,
                 train: bool = True, seed: int = 0, skip_bad_images: bool = False, scale_mode: str = "list") -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.scales = _check_scales(scales)
        check_scale_mode(self.scales, scale_mode)
        self.scale_mode = scale_mode
        self.flip_prob = (0.5 if train else 0.0) if flip_prob is None else float(flip_prob)
        if not 0.0 <= self.flip_prob <= 1.0:
            raise LadError(f"flip probability must be in [0, 1], got {self.flip_prob}")
        self.train, self.seed, self.skip_bad_images = train, int(seed), skip_bad_images
        if not self.image_dir.is_dir():
            raise LadError(f"image directory {self.image_dir} does not exist")
        data = load_coco_json(self.ann_file)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            try:
                coco.createIndex()
            except (TypeError, KeyError) as exc:
                raise LadError(f"annotation file {self.ann_file} is not a COCO instances file ({exc})") from None
        self._parse(coco)
        self.bad_images: dict[int, str] = {}

    # -- annotations ------------------------------------------------------------------------------
    def _parse(self, coco: COCO) -> None:
        cats = coco.loadCats(coco.getCatIds())
        cat_ids = sorted(int(c["id"]) for c in cats)
        if len(set(cat_ids)) != len(cat_ids):
            raise LadError(f"annotation file {self.ann_file} lists a category id twice")
        names = {int(c["id"]): str(c["name"]) for c in cats}
        self.label_to_cat: list[int] = cat_ids
        self.class_names: list[str] = [names[c] for c in cat_ids]
        self.cat_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}

        images = coco.dataset["images"]
        all_ids = [int(im["id"]) for im in images]
        if len(set(all_ids)) != len(all_ids):
            raise LadError(f"annotation file {self.ann_file} lists an image id twice")
        row_of = {i: r for r, i in enumerate(all_ids)}
        try:
            sizes = np.array([[im["height"], im["width"]] for im in images], dtype=np.float64).reshape(-1, 2)
        except (ValueError, TypeError):
            sizes = np.full((1, 2), np.nan)
        if not np.isfinite(sizes).all() or (sizes < 1).any():
            raise LadError(f"annotation file {self.ann_file}: every image needs a positive 'width' and 'height'")

        anns = coco.dataset["annotations"]
        try:
            rows = np.array([row_of[a["image_id"]] for a in anns], dtype=np.int64)
        except KeyError as exc:
            raise LadError(f"annotation file {self.ann_file}: an annotation refers to image id {exc.args[0]}, "
                           f"which is not in 'images'") from None
        for a in anns:
            if a["category_id"] not in self.cat_to_label:
                raise LadError(f"annotation file {self.ann_file}: annotation {a['id']} has category id "
                               f"{a['category_id']}, which is not in 'categories'")
        try:
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), -1) if anns \
                else np.zeros((0, 4))
        except (ValueError, TypeError):
            xywh = np.zeros((0, 0))
        try:
            area = np.array([a.get("area", b[2] * b[3]) for a, b in zip(anns, xywh)], dtype=np.float64)
        except (ValueError, TypeError, IndexError):
            area = np.zeros(0)
        if xywh.shape != (len(anns), 4) or area.shape != (len(anns),):
            raise LadError(f"annotation file {self.ann_file}: every 'bbox' must be 4 numbers [x, y, w, h] "
                           f"and every 'area' a number")
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        skip = np.array([bool(a.get("ignore", False)) for a in anns], dtype=bool)  # mmdetection skips these

        # mmdetection's rules, vectorised over all annotations
        x1, y1, w, h = xywh.T
        img_h, img_w = sizes[rows, 0], sizes[rows, 1]
        inter_w = np.maximum(0, np.minimum(x1 + w, img_w) - np.maximum(x1, 0))
        inter_h = np.maximum(0, np.minimum(y1 + h, img_h) - np.maximum(y1, 0))
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(xywh).all(1) | (inter_w * inter_h <= 0) | (area <= 0) | (w < 1) | (h < 1)
            outside = (x1 < 0) | (y1 < 0) | (x1 + w > img_w) | (y1 + h > img_h)
        dropped, keep = bad & ~skip, ~bad & ~skip
        self.box_stats = {"dropped": int(dropped.sum()), "clipped": int((keep & outside).sum())}
        if self.box_stats["dropped"] or self.box_stats["clipped"]:
            log.warning("%s: %d boxes dropped (no overlap with their image, narrower or shorter than 1 px, or "
                        "area <= 0), %d boxes partly outside their image clipped to it", self.ann_file,
                        self.box_stats["dropped"], self.box_stats["clipped"])
        xyxy = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)

        gt, ign = keep & ~crowd, keep & crowd
        gt_rows, ign_rows = rows[gt], rows[ign]
        gt_order, ign_order = np.argsort(gt_rows, kind="stable"), np.argsort(ign_rows, kind="stable")
        self._boxes = xyxy[gt][gt_order]
        self._labels = labels[gt][gt_order]
        self._ignore = xyxy[ign][ign_order]
        gt_off, ign_off = _csr(gt_rows, len(all_ids)), _csr(ign_rows, len(all_ids))

        use = np.ones(len(all_ids), dtype=bool)
        if self.train:
            small = sizes.min(1) < MIN_TRAIN_IMAGE_SIDE
            empty = np.diff(gt_off) == 0
            use = ~small & ~empty
            self.filtered = {"without_boxes": int((empty & ~small).sum()), "too_small": int(small.sum())}
        else:
            self.filtered = {"without_boxes": 0, "too_small": 0}
        keep_rows = np.flatnonzero(use)
        if self.train and len(keep_rows) == 0:
            raise LadError(f"annotation file {self.ann_file} has no image with a usable box to train on")
        self.image_ids: list[int] = [all_ids[r] for r in keep_rows]
        self._row = {i: n for n, i in enumerate(self.image_ids)}
        self._files = [str(images[r]["file_name"]) for r in keep_rows]
        self._sizes = sizes[keep_rows].astype(np.int64)
        self._gt_off = np.stack([gt_off[keep_rows], gt_off[keep_rows + 1]], 1)
        self._ign_off = np.stack([ign_off[keep_rows], ign_off[keep_rows + 1]], 1)

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat)

    def check_num_classes(self, num_classes: int, model: str = "the model") -> None:
        """LadError unless the dataset has as many categories as ``model`` predicts classes."""
        if self.num_classes != num_classes:
            raise LadError(f"{self.ann_file} has {self.num_classes} categories but {model} predicts {num_classes} "
                           f"classes (model.num_classes)")

    def _index(self, image_id: int) -> int:
        try:
            return self._row[int(image_id)]
        except KeyError:
            raise LadError(f"image id {image_id} is not in the dataset of {self.ann_file}") from None

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(H, W) of the original image, from the annotations."""
        h, w = self._sizes[self._index(image_id)]
        return int(h), int(w)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self._files[self._index(image_id)]

    def original_targets(self, image_id: int) -> Targets:
        """The image's targets in original pixels (unclipped, as annotated)."""
        n = self._index(image_id)
        (a, b), (c, d) = self._gt_off[n], self._ign_off[n]
        return Targets(torch.from_numpy(self._boxes[a:b].copy()), torch.from_numpy(self._labels[a:b].copy()),
                       torch.from_numpy(self._ignore[c:d].copy()))

    # -- views ------------------------------------------------------------------------------------
    def load_view(self, key: ViewKey) -> View:
        """The view ``key``; raises LadError (BadImageError for an unusable image file)."""
        key = ViewKey(int(key[0]), (int(key[1][0]), int(key[1][1])), bool(key[2]))
        path = self.image_path(key.image_id)
        try:
            image = read_image(path)
        except LadError as exc:
            raise BadImageError(str(exc)) from None
        expected = self.image_size(key.image_id)
        got = (int(image.shape[-2]), int(image.shape[-1]))
        if got != expected:
            raise BadImageError(self._size_mismatch(path, got, expected))
        try:
            return make_view(image, self.original_targets(key.image_id), key)
        except LadError as exc:
            raise BadImageError(f"{path}: {exc}") from None

    def _size_mismatch(self, path: Path, size: tuple[int, int], expected: tuple[int, int]) -> str:
        message = (f"image {path} is {size[1]}x{size[0]} pixels but {self.ann_file} says "
                   f"{expected[1]}x{expected[0]}")
        stored = tuple(read_image(path, exif_orientation=False).shape[-2:])
        if stored != size and stored == expected:
            message += (" (its size before its EXIF orientation tag turns it upright: the annotations were made on "
                        "the unrotated pixels; remove the tag or annotate the upright image)")
        return message

    def __getitem__(self, key: Union[ViewKey, int]) -> Optional[View]:
        """``dataset[ViewKey]``; an int ``n`` means the unflipped view of the n-th image at the first scale."""
        if isinstance(key, (int, np.integer)):
            key = ViewKey(self.image_ids[int(key)], self.scales[0], False)
        if not self.skip_bad_images:
            return self.load_view(key)
        try:
            return self.load_view(key)
        except BadImageError as exc:
            if key[0] not in self.bad_images:
                self.bad_images[key[0]] = str(exc)
                log.warning("skipping image %s (%d skipped so far in this process): %s", key[0],
                            len(self.bad_images), exc)
            return None

    def __len__(self) -> int:
        return len(self.image_ids)

    def train_keys(self, epoch: int) -> list[ViewKey]:
        """The training views of ``epoch`` in training order: same (seed, epoch), same views."""
        return draw_train_keys(self.image_ids, self.scales, self.flip_prob, self.seed, epoch, self.scale_mode)

    def views_for(self, variants: Sequence[str] = ("identity", "hflip"),
                  scales: Optional[Sequence[Sequence[int]]] = None) -> list[ViewKey]:
        """Every (image, scale, variant) view, image-major (``lad cache-labels``)."""
        return variant_keys(self.image_ids, self.scales if scales is None else _check_scales(scales), variants)

    def eval_keys(self) -> list[ViewKey]:
        """One unflipped view per image at the first scale, in annotation-file order."""
        return variant_keys(self.image_ids, self.scales[:1], ("identity",))


def _check_scales(scales: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    out = []
    for s in scales:
        if len(s) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                  for v in s):
            raise LadError(f"a scale must be two positive integers (long, short), got {list(s)}")
        out.append((int(s[0]), int(s[1])))
    if not out:
        raise LadError("no scale configured: give at least one (long, short) scale")
    return tuple(out)
