"""A small, real-handwriting detection dataset in COCO format, made deterministically from sklearn's digits.

``sklearn.datasets.load_digits`` (1,797 real 8x8 handwritten digits, shipped with scikit-learn) is split
into disjoint train and val pools; each image pastes a few upscaled digits (truncated at the border,
overlapping, sometimes partly occluded) on a textured background with some distractor clutter, and sometimes
a cluster of tiny digits annotated as one crowd box. ``ToyStyle`` sets the sizes and how much gets in the
way; the default (96-144 px images, 28-64 px digits) trains a ResNet-18 PAA to a useful AP on two CPU cores
in minutes. Same seed and style, same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from sklearn.datasets import load_digits
from torchvision.io import encode_png

from ..errors import LadError
from ..runtime.progress import Progress
from .transforms import quiet_torchvision_io

VERSION = 2
MANIFEST = "toy.json"
VAL_POOL_FRACTION = 0.2


@dataclass(frozen=True)
class ToyStyle:
    """How the images are drawn: sizes (pixels, inclusive ranges) and how much gets in the way."""

    image_side: tuple[int, int] = (96, 144)  # each side drawn separately: several aspect ratios
    digit_side: tuple[int, int] = (28, 64)  # log-uniform digit height, before the border crop
    digits: tuple[int, int] = (2, 5)  # digits per image (fewer when they do not fit)
    clutter: tuple[int, int] = (0, 1)  # distractors per image
    occlude_prob: float = 0.05  # a digit gets a bar over one side
    crowd_prob: float = 0.1  # an image gets a crowd box of tiny digits

    def __post_init__(self) -> None:
        for name in ("image_side", "digit_side", "digits", "clutter"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise LadError(f"toy style {name}: expected 0 <= low <= high, got {(lo, hi)}")
        if self.image_side[0] < 64 or self.digit_side[0] < 8:
            raise LadError("toy style: images need sides of at least 64 px and digits at least 8 px")


def make_toy_dataset(out: Union[str, Path], n_train: int = 512, n_val: int = 128, seed: int = 0, *,
                     overwrite: bool = False, style: ToyStyle = ToyStyle()) -> Path:
    """Write ``out/{train,val}/annotations.json`` and ``images/*.png``; returns ``out``.

    Built in a temporary sibling directory and renamed into place, so an interrupted run never leaves a
    dataset at ``out``. A non-empty ``out`` is refused unless ``overwrite`` (and then only a toy dataset).
    """
    out = Path(out)
    if n_train < 0 or n_val < 0 or seed < 0:
        raise LadError("image counts and the seed must be non-negative")
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pools = _split_pools(len(digits.target), seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    progress = Progress(n_train + n_val, "toy images", "img")
    try:
        for split_no, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            _write_split(tmp / split, split_no, n, pools[split], digits.images, digits.target, seed, style,
                         progress)
        manifest = {"generator": "lad make-toy-data", "version": VERSION, "seed": seed, "train": n_train,
                    "val": n_val, "source": "sklearn.datasets.load_digits", "style": asdict(style)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.close()
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LadError(f"{out} exists and is not a directory", hint="choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LadError(f"output directory {out} is not empty",
                           hint="pass --overwrite to replace it, or choose another OUT")
        if not (out / MANIFEST).is_file():
            raise LadError(f"{out} is not empty and holds no {MANIFEST}, so it is not a toy dataset made by lad: "
                           f"refusing to delete it", hint="choose another OUT")


def _commit(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):  # --overwrite: move the old dataset aside, then swap
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)


def _split_pools(n: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(n)
    n_val = int(round(n * VAL_POOL_FRACTION))
    return {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def _write_split(root: Path, split_no: int, n: int, pool: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 seed: int, style: ToyStyle, progress: Progress) -> None:
    (root / "images").mkdir(parents=True)
    by_class = [pool[labels[pool] == c] for c in range(10)]
    records: list[dict] = []
    anns: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_no, index]))
        pixels, objects = _render(rng, style, pool, by_class, images, labels)
        name = f"{index:06d}.png"
        with quiet_torchvision_io():
            png = encode_png(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
        (root / "images" / name).write_bytes(png.numpy().tobytes())
        records.append({"id": index + 1, "file_name": name, "height": int(pixels.shape[0]),
                        "width": int(pixels.shape[1])})
        for obj in objects:
            x1, y1, x2, y2 = obj.pop("box")
            anns.append({"id": len(anns) + 1, "image_id": index + 1, "category_id": obj.pop("label") + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), **obj})
        progress.update(1)
    data = {"info": {"description": "lad toy digits", "version": str(VERSION)}, "licenses": [],
            "images": records, "annotations": anns,
            "categories": [{"id": c + 1, "name": str(c), "supercategory": "digit"} for c in range(10)]}
    (root / "annotations.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")


# -- drawing ------------------------------------------------------------------------------------------
def _interp(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights ``[n_out, n_in]`` with half-pixel centres (an upscaling matrix)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(n_out), hi), src - lo)
    return m


def _upscale(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upscaling of ``[gh, gw]`` or ``[gh, gw, C]`` to ``(h, w)``."""
    a3 = a if a.ndim == 3 else a[..., None]
    gh, gw, c = a3.shape
    rows = (_interp(h, gh) @ a3.reshape(gh, gw * c)).reshape(h, gw, c)
    out = np.matmul(_interp(w, gw)[None], rows)  # [1, w, gw] @ [h, gw, c] -> [h, w, c]
    return out if a.ndim == 3 else out[..., 0]


def _paint(img: np.ndarray, alpha: np.ndarray, color: np.ndarray, y: int = 0, x: int = 0) -> None:
    """Alpha-composite ``color`` into ``img`` at (y, x) through ``alpha`` (cropped to the image)."""
    h, w = img.shape[:2]
    ah, aw = alpha.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + ah, h), min(x + aw, w)
    if y1 <= y0 or x1 <= x0:
        return
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x, None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + color * a


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    gh, gw = rng.integers(2, 7, size=2)
    img = _upscale(rng.uniform(0, 255, (gh, gw, 3)), h, w)  # smooth colour field
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    wave = (xx * np.cos(theta) + yy * np.sin(theta)) * rng.uniform(0.05, 0.6) + phase
    texture = np.sin(wave) if rng.random() < 0.6 else np.sign(np.sin(wave) * np.sin(xx * rng.uniform(0.05, 0.4)))
    img += texture[..., None] * rng.uniform(0, 40) * rng.uniform(-1, 1, 3)
    img += rng.normal(0, rng.uniform(2, 10), (h, w, 3))  # grain
    return img


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Distractors: discs, rectangles, thick lines and scribbles, which are not digits."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for _ in range(count):
        kind, color = rng.integers(0, 4), rng.uniform(0, 255, 3)
        if kind == 0:
            cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 5), rng.uniform(3, w / 5)
            alpha = np.clip(1.5 - 1.5 * np.hypot((yy - cy) / ry, (xx - cx) / rx), 0, 1)
        elif kind == 1:
            y0, x0 = rng.uniform(-10, h), rng.uniform(-10, w)
            y1, x1 = y0 + rng.uniform(4, h / 3), x0 + rng.uniform(4, w / 3)
            alpha = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).astype(np.float64)
            if rng.random() < 0.5:  # outline only
                t = rng.uniform(1, 4)
                alpha *= ~((yy >= y0 + t) & (yy < y1 - t) & (xx >= x0 + t) & (xx < x1 - t))
        elif kind == 2:  # a long straight line (short thick ones would look like a "1")
            start = rng.uniform(0, 1, 2) * [h, w]
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.0) * min(h, w)
            points = np.stack([start, start + length * np.array([np.sin(angle), np.cos(angle)])])
            alpha = _polyline(yy, xx, points, rng.uniform(1, 5))
        else:  # a thin local zigzag, many-cornered so it does not read as a digit
            points = rng.uniform(0, 1, 2) * [h, w] + rng.uniform(-20, 20, (int(rng.integers(5, 9)), 2))
            alpha = _polyline(yy, xx, points, rng.uniform(1, 2.5))
        _paint(img, alpha * rng.uniform(0.6, 1), color)


def _polyline(yy: np.ndarray, xx: np.ndarray, points: np.ndarray, thickness: float) -> np.ndarray:
    dist = np.full(yy.shape, np.inf)
    for (ay, ax), (by, bx) in zip(points[:-1], points[1:]):
        dy, dx = by - ay, bx - ax
        t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        dist = np.minimum(dist, np.hypot(yy - ay - t * dy, xx - ax - t * dx))
    return np.clip(thickness / 2 + 0.5 - dist, 0, 1)


def _digit_alpha(rng: np.random.Generator, digit: np.ndarray, h: int, w: int) -> np.ndarray:
    """An 8x8 digit (0..16) upscaled to (h, w) as an opacity map with a random stroke weight."""
    v = _upscale(digit / 16.0, h, w)
    lo = rng.uniform(0.1, 0.35)
    return np.clip((v - lo) / 0.3, 0, 1)


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    color = rng.uniform(0, 255, 3)
    if abs(color.mean() - background.mean()) < 70:
        color = rng.uniform(0, 60, 3) if background.mean() > 127 else rng.uniform(195, 255, 3)
    return color


def _place(rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray, placed: list, limit: float,
           tries: int = 20):
    """A position for ``alpha`` whose visible tight box overlaps earlier boxes little; None if none found."""
    h, w = img.shape[:2]
    ah, aw = alpha.shape
    for _ in range(tries):
        y = int(rng.integers(-int(0.15 * ah), max(h - int(0.85 * ah), 1)))
        x = int(rng.integers(-int(0.15 * aw), max(w - int(0.85 * aw), 1)))
        visible = alpha[max(-y, 0):h - y, max(-x, 0):w - x] > 0.5  # the part inside the image
        rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
        if len(rows) == 0 or len(cols) == 0:
            continue
        top, left = max(y, 0), max(x, 0)
        box = (left + int(cols[0]), top + int(rows[0]), left + int(cols[-1]) + 1, top + int(rows[-1]) + 1)
        if min(box[2] - box[0], box[3] - box[1]) < 4 or not _fits(box, placed, limit):
            continue
        return y, x, box
    return None


def _fits(box: tuple, placed: list, limit: float) -> bool:
    """At most ``limit`` of any earlier box (and of the new one) may be covered by the other."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > limit * area or inter > limit * (other[2] - other[0]) * (other[3] - other[1]):
                return False
    return True


def _render(rng: np.random.Generator, style: ToyStyle, pool: np.ndarray, by_class: list, images: np.ndarray,
            labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    h, w = (int(v) for v in rng.integers(style.image_side[0], style.image_side[1] + 1, size=2))
    img = _background(rng, h, w)
    _clutter(rng, img, int(rng.integers(style.clutter[0], style.clutter[1] + 1)))
    objects: list[dict] = []
    placed: list[tuple] = []
    if rng.random() < style.crowd_prob:
        objects += _crowd(rng, img, by_class, images, placed)
    for _ in range(int(rng.integers(style.digits[0], style.digits[1] + 1))):
        index = int(pool[rng.integers(len(pool))])
        side = np.exp(rng.uniform(np.log(style.digit_side[0]), np.log(style.digit_side[1])))
        side = min(side, 0.8 * min(h, w))
        dh, dw = int(side), max(int(side * rng.uniform(0.65, 1.1)), 8)
        alpha = _digit_alpha(rng, images[index], dh, dw)
        spot = _place(rng, img, alpha, placed, limit=0.45)
        if spot is None:
            continue
        y, x, box = spot
        region = img[max(y, 0):y + dh, max(x, 0):x + dw]
        _paint(img, alpha, _contrasting(rng, region), y, x)
        placed.append(box)
        objects.append({"box": box, "label": int(labels[index]), "iscrowd": 0, "digit_index": index})
    for obj in objects:  # occluders: a bar over one side of a digit; the box stays the whole digit
        if obj["iscrowd"] or rng.random() >= style.occlude_prob:
            continue
        x1, y1, x2, y2 = obj["box"]
        frac, side = rng.uniform(0.15, 0.35), int(rng.integers(4))
        bar = np.ones((y2 - y1, max(int((x2 - x1) * frac), 1))) if side < 2 else \
            np.ones((max(int((y2 - y1) * frac), 1), x2 - x1))
        y = y1 if side != 3 else y2 - bar.shape[0]
        x = x1 if side != 1 else x2 - bar.shape[1]
        _paint(img, bar, rng.uniform(0, 255, 3), y, x)
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _crowd(rng: np.random.Generator, img: np.ndarray, by_class: list, images: np.ndarray,
           placed: list) -> list[dict]:
    """A cluster of tiny digits of one class, annotated as a single crowd box (COCO's iscrowd=1)."""
    h, w = img.shape[:2]
    label = int(rng.integers(10))
    side = int(rng.integers(min(h, w) * 0.3, min(h, w) * 0.55 + 1))  # 30-55 % of the shorter side
    y0, x0 = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    color = _contrasting(rng, img[y0:y0 + side, x0:x0 + side])
    indices, boxes = [], []
    for _ in range(int(rng.integers(5, 11))):
        index = int(by_class[label][rng.integers(len(by_class[label]))])
        d = int(rng.integers(8, 14))
        y, x = y0 + int(rng.integers(0, side - d)), x0 + int(rng.integers(0, side - d))
        _paint(img, _digit_alpha(rng, images[index], d, d), color, y, x)
        indices.append(index)
        boxes.append((x, y, x + d, y + d))
    box = tuple(int(v) for v in (*np.min(boxes, 0)[:2], *np.max(boxes, 0)[2:]))
    placed.append(box)
    return [{"box": box, "label": label, "iscrowd": 1, "digit_indices": indices}]
