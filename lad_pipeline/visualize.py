"""Pictures of what a detector found (``lad show``) and of what a teacher taught (``lad show-labels``).

Images are uint8 ``[3, H, W]`` RGB tensors, as the data pipeline decodes them; boxes and labels are
drawn with ``torchvision.utils.draw_bounding_boxes``, anchor marks with plain tensor indexing.

An assignment picture shows, on the view the teacher saw:

* every GT box, thick, in the colour of that GT (``palette``), labelled ``"<gt> <class name>"``;
* every positive anchor as a filled square with a black rim at its anchor centre ``(x * stride,
  y * stride)``, in the colour of its GT. Coarser FPN levels get bigger squares, drawn first, so
  positives of several levels at one centre show as nested squares;
* every candidate the GMM split rejected as a faint hollow square in the colour of its GT.

A mark stays closer to its centre than the smallest distance between two anchor centres, so the
pixel at a positive's centre always carries the colour of a positive anchored there.

Small images are enlarged for drawing (``auto_zoom``): marks and text keep their pixel size, so the digit
under a positive stays visible. ``add_caption`` puts a title and a colour legend under a picture, so that it
reads on its own.

A soft-label picture (``draw_soft_scores``) shows the GT boxes and every anchor the teacher's soft record
stores, as a filled square coloured by its top stored teacher probability (``score_color``: dark blue for
0, through green, to yellow for 1); the box-KD anchors get a white rim, the others a black one.
"""
from __future__ import annotations

import colorsys
import math
import os
from functools import reduce
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes

from .data.transforms import quiet_torchvision_io
from .models.anchors import AnchorLayout
from .runtime.atomic import atomic_write
from .types import Assignment, Detections, Targets

Color = tuple[int, int, int]

_GOLDEN = 0.618033988749895
REJECTED_ALPHA = 0.55  # opacity of the hollow marks of rejected candidates
RIM = (0, 0, 0)  # rim around positive marks: visible on any colour
BOX_KD_RIM = (255, 255, 255)  # rim around the box-KD anchors of a soft-label picture
# a viridis-like ramp for soft scores: probability 0, 0.25, 0.5, 0.75, 1
SCORE_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def palette(n: int) -> list[Color]:
    """``n`` distinct, saturated RGB colours; the i-th colour never depends on ``n``.

    Hues step by the golden ratio (well spread for any prefix); value and saturation alternate so
    that neighbours in hue still differ.
    """
    return [color(i) for i in range(n)]


def color(i: int) -> Color:
    """The i-th colour of ``palette``."""
    hue = (0.05 + i * _GOLDEN) % 1.0
    sat = (0.95, 0.75, 0.6)[(i // 3) % 3]
    val = (1.0, 0.8)[i % 2]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def hex_color(c: Color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _text_color(c: Color) -> Color:
    """Black or white, whichever reads better on ``c``."""
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _name(class_names: Optional[Sequence[str]], label: int) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _check_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")


def auto_zoom(height: int, width: int, target: int = 512) -> int:
    """The whole-number enlargement that brings the long side of a small image to about ``target`` pixels
    (1 for an image that is already that big, at most 16)."""
    return max(1, min(16, round(target / max(height, width, 1))))


def enlarge(image: Tensor, zoom: int) -> Tensor:
    """``image`` with every pixel repeated ``zoom`` times in each direction (no smoothing)."""
    return image if zoom == 1 else image.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)


def class_text(class_names: Optional[Sequence[str]], label: int) -> str:
    """A class as a label that cannot run into a number next to it: its name, or ``cls 3`` for a numeric one."""
    name = _name(class_names, label)
    return f"cls {name}" if name.replace(".", "", 1).isdigit() else name


def plural(count: int, noun: str, nouns: Optional[str] = None) -> str:
    """``1 detection``, ``2 detections``."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def add_caption(image: Tensor, title: str, legend: Sequence[tuple[Color, str]] = (),
                notes: Sequence[str] = ()) -> Tensor:
    """``image`` with a white strip underneath: the ``title``, then a colour swatch and text per ``legend``
    entry (wrapped to the picture's width), then ``notes`` lines. The picture above keeps its pixels."""
    from PIL import Image, ImageDraw

    _check_image(image)
    font, pad, line = _font(), 6, 18
    width = max(int(image.shape[2]), 320)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[Color, str, int]]] = [[]]
    x = pad
    for swatch, text in legend:
        w = line + int(measure.textlength(text, font=font)) + 14
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((swatch, text, x))
        x += w
    rows = [r for r in rows if r]
    height = pad + line * (1 + len(rows) + len(notes)) + pad
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    y = pad + line
    for row in rows:
        for swatch, text, x in row:
            draw.rectangle([x, y + 2, x + line - 6, y + line - 4], fill=swatch, outline=(0, 0, 0))
            draw.text((x + line, y), text, fill=(0, 0, 0), font=font)
        y += line
    for note in notes:
        draw.text((pad, y), note, fill=(60, 60, 60), font=font)
        y += line
    below = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)
    canvas = torch.full((3, image.shape[1] + height, width), 255, dtype=torch.uint8)
    canvas[:, :image.shape[1], :image.shape[2]] = image.cpu()
    canvas[:, image.shape[1]:, :] = below
    return canvas


def _tags(image: Tensor, boxes: Tensor, texts: Sequence[str], colors: Sequence[Color], below: bool = False
          ) -> Tensor:
    """Each box's label on a filled tag in the box colour, drawn with PIL at a fixed pixel size whatever the
    zoom: outside the box, above its top-left corner (``below``: under its bottom-left corner) where the
    picture has room, else just inside."""
    from PIL import Image, ImageDraw

    if boxes.shape[0] == 0:
        return image
    picture = Image.fromarray(image.cpu().permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(picture), _font()
    for box, text, c in zip(boxes.tolist(), texts, colors):
        x1, y1, x2, y2 = box
        w = int(draw.textlength(text, font=font)) + 6
        x = min(max(0, int(x1)), max(0, picture.width - w))
        room_below, room_above = y2 + 17 < picture.height, y1 >= 17
        if below:
            y = int(y2) + 1 if room_below else (int(y1) - 17 if room_above else max(0, int(y2) - 17))
        else:
            y = int(y1) - 17 if room_above else max(0, int(y1))
        draw.rectangle([x, y, x + w, y + 16], fill=tuple(c))
        draw.text((x + 3, y + 1), text, fill=_text_color(c), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def _boxes_then_labels(image: Tensor, boxes: Tensor, texts: Sequence[str], colors: Sequence[Color],
                       width: int) -> Tensor:
    boxes = boxes.detach().cpu().float()
    return _tags(_outlines(image, boxes, colors, width), boxes, texts, colors)


def display_order(dets: Detections, score_thr: float, overlap: float = 0.5) -> tuple[Tensor, int]:
    """Which detections a picture draws: those scoring above ``score_thr``, less each one that overlaps
    (IoU > ``overlap``, any class) a higher-scoring drawn one, whose label it would hide. Returns their
    indices, lowest score first (drawn first, so the best lies on top), and how many were left out."""
    from torchvision.ops import nms

    scores = dets.scores.detach().cpu()
    above = torch.nonzero(scores > score_thr).flatten()
    if above.numel() == 0:
        return above, 0
    kept = above[nms(dets.boxes.detach().cpu().float()[above], scores[above], overlap)]
    return kept.flip(0), int(above.numel() - kept.numel())


def draw_detections(image: Tensor, dets: Detections, class_names: Optional[Sequence[str]] = None,
                    score_thr: float = 0.3, width: int = 2) -> Tensor:
    """The detections scoring above ``score_thr`` drawn on ``image`` (uint8 ``[3, H, W]``, same pixels
    as the boxes), one colour per class, labelled ``"<class>: <score>"``; returns a new image.

    The highest-scoring boxes are drawn last, on top.
    """
    _check_image(image)
    keep = torch.nonzero(dets.scores.detach().cpu() > score_thr).flatten()
    scores = dets.scores.detach().cpu()[keep]
    order = keep[torch.argsort(scores, stable=True)]
    boxes = dets.boxes.detach().cpu()[order]
    labels = dets.labels.detach().cpu()[order].tolist()
    shown = dets.scores.detach().cpu()[order].tolist()
    text = [f"{class_text(class_names, lab)}: {s:.2f}" for lab, s in zip(labels, shown)]
    return _boxes_then_labels(image, boxes, text, [color(lab) for lab in labels], width)


# -- assignments ---------------------------------------------------------------------------------
class GTSummary(NamedTuple):
    """One GT of an assignment picture: what it is, its colour and what the teacher gave it."""

    gt: int
    label: int
    name: str
    box: tuple[float, float, float, float]
    color: Color
    positives: int  # anchors assigned to it (gt_index == gt)
    candidates: int  # anchors the GMM split saw for it (positive or rejected)


def anchor_centres(index: Tensor, pad_size: Sequence[int], anchors: AnchorLayout) -> tuple[Tensor, Tensor]:
    """Centres ``[N, 2]`` (x, y) in view pixels and FPN levels ``[N]`` of flat anchor indices of a view's own
    padded grid (level-major, then y, then x; one anchor per location, centred at (x * stride, y * stride))."""
    sizes = anchors.feature_sizes(pad_size)
    counts = torch.tensor([h * w for h, w in sizes], dtype=torch.int64)
    ends = counts.cumsum(0)
    index = index.detach().cpu().to(torch.int64).reshape(-1)
    if index.numel() and (index.min() < 0 or index.max() >= ends[-1]):
        raise ValueError(f"anchor index outside the own grid of pad size {tuple(pad_size)} (0..{int(ends[-1]) - 1})")
    level = torch.bucketize(index, ends, right=True)
    local = index - (ends - counts)[level]
    widths = torch.tensor([w for _, w in sizes], dtype=torch.int64)[level]
    stride = torch.tensor(anchors.strides, dtype=torch.int64)[level]
    return torch.stack([local % widths * stride, local // widths * stride], 1), level


def mark_half_sizes(strides: Sequence[int]) -> list[int]:
    """Half side of the square marking an anchor of each level.

    Grows with the level, but a mark (with its 1-px rim) stays closer to its centre than the smallest
    distance between two anchor centres (the gcd of the strides) and never touches its same-level
    neighbours.
    """
    step = reduce(math.gcd, [int(s) for s in strides])
    return [max(0, min(2 + level, step - 2, int(s) // 2 - 2)) for level, s in enumerate(strides)]


def _square_offsets(half: int, hollow: bool) -> tuple[Tensor, Tensor]:
    d = torch.arange(-half, half + 1)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)
    if hollow and half > 0:
        ring = torch.maximum(dy.abs(), dx.abs()) == half
        dy, dx = dy[ring], dx[ring]
    return dy, dx


def _paint_squares(canvas: Tensor, centres: Tensor, colors: Tensor, half: int, *, hollow: bool = False,
                   alpha: float = 1.0) -> None:
    """Paint squares of side ``2 * half + 1`` centred at ``centres`` (x, y) in place on a float ``[3, H, W]``
    canvas; ``colors [N, 3]``; squares are clipped to the canvas. Squares given together must not overlap."""
    if centres.shape[0] == 0:
        return
    dy, dx = _square_offsets(half, hollow)
    ys = (centres[:, 1:2] + dy[None]).reshape(-1)
    xs = (centres[:, 0:1] + dx[None]).reshape(-1)
    owner = torch.arange(centres.shape[0]).repeat_interleave(dy.numel())
    inside = (ys >= 0) & (ys < canvas.shape[1]) & (xs >= 0) & (xs < canvas.shape[2])
    ys, xs, owner = ys[inside], xs[inside], owner[inside]
    paint = colors[owner].T  # [3, P]
    if alpha < 1.0:
        paint = alpha * paint + (1.0 - alpha) * canvas[:, ys, xs]
    canvas[:, ys, xs] = paint


def draw_assignment(image: Tensor, targets: Targets, assignment: Assignment, pad_size: Sequence[int],
                    anchors: AnchorLayout, class_names: Optional[Sequence[str]] = None,
                    box_width: int = 3, zoom: int = 1) -> tuple[Tensor, list[GTSummary]]:
    """A teacher's assignment of one view drawn on the view (see the module docstring for what is drawn).

    ``image``: the view, uint8 ``[3, h, w]``; ``targets`` in view pixels; ``assignment`` over the view's own
    padded grid ``pad_size`` (H, W), as the label cache stores it, on the layout ``anchors`` (the cache's, or the
    teacher's). ``zoom``: the view enlarged this many times, marks and labels at their own size (see
    ``auto_zoom``). Returns the new image and one summary row per GT (``format_summary`` makes the legend lines).
    """
    _check_image(image)
    num_anchors = anchors.num_anchors(anchors.feature_sizes(pad_size))
    gt_index = assignment.gt_index.detach().cpu()
    if gt_index.numel() != num_anchors:
        raise ValueError(f"assignment has {gt_index.numel()} anchors but the own grid of pad size "
                         f"{tuple(pad_size)} has {num_anchors}")
    boxes = targets.boxes.detach().cpu().float().reshape(-1, 4)
    labels = targets.labels.detach().cpu().tolist()
    num_gt = boxes.shape[0]
    colors = palette(num_gt)
    cand_gt = assignment.cand_gt.detach().cpu().to(torch.int64)
    cand_pos = assignment.cand_pos.detach().cpu().to(torch.bool)
    rows = [
        GTSummary(g, int(labels[g]), _name(class_names, int(labels[g])), _box_tuple(boxes[g]),
                  colors[g], int((gt_index == g).sum()), int((cand_gt == g).sum()))
        for g in range(num_gt)
    ]
    text = [f"gt {g}" for g in range(num_gt)]  # the legend says which class
    canvas = _outlines(enlarge(image, zoom), boxes * zoom, colors, box_width).float()
    if num_gt == 0:
        return canvas.to(torch.uint8), rows

    color_table = torch.tensor(colors, dtype=torch.float32)
    halves = mark_half_sizes(anchors.strides)
    # rejected candidates: faint hollow squares
    rejected = ~cand_pos
    centres, levels = _zoomed_centres(assignment.cand_anchor[rejected], pad_size, anchors, zoom)
    rej_gt = cand_gt[rejected]
    for level in reversed(range(anchors.num_levels)):
        sel = levels == level
        _paint_squares(canvas, centres[sel], color_table[rej_gt[sel]], halves[level], hollow=True,
                       alpha=REJECTED_ALPHA)
    # positives: filled squares with a black rim, coarse levels first so fine ones stay on top
    pos = torch.nonzero(gt_index >= 0).flatten()
    centres, levels = _zoomed_centres(pos, pad_size, anchors, zoom)
    pos_gt = gt_index[pos]
    rim = torch.tensor(RIM, dtype=torch.float32).expand(len(pos), 3)
    for level in reversed(range(anchors.num_levels)):
        sel = levels == level
        _paint_squares(canvas, centres[sel], rim[sel], halves[level] + 1)
        _paint_squares(canvas, centres[sel], color_table[pos_gt[sel]], halves[level])
    # the GT labels last, under their boxes: no mark hides them, and they hide neither the object nor its marks
    return _tags(canvas.round().clamp(0, 255).to(torch.uint8), boxes * zoom, text, colors, below=True), rows


GT_COLOR: Color = (255, 255, 255)  # ground-truth outlines in a detection picture


def draw_outlines(image: Tensor, boxes: Tensor, color: Color = GT_COLOR, width: int = 2) -> Tensor:
    """Unlabelled box outlines in one colour (e.g. the ground truth under a detector's boxes)."""
    _check_image(image)
    return _outlines(image, boxes.reshape(-1, 4), [color] * len(boxes.reshape(-1, 4)), width)


def _outlines(image: Tensor, boxes: Tensor, colors: Sequence[Color], width: int) -> Tensor:
    if boxes.shape[0] == 0:
        return image.clone()
    return draw_bounding_boxes(image.cpu(), boxes.detach().cpu().float(), colors=list(colors), width=width)


def _zoomed_centres(index: Tensor, pad_size: Sequence[int], anchors: AnchorLayout, zoom: int
                    ) -> tuple[Tensor, Tensor]:
    """``anchor_centres`` on a view enlarged ``zoom`` times: the centre pixel of each enlarged pixel."""
    centres, levels = anchor_centres(index, pad_size, anchors)
    return centres * zoom + zoom // 2, levels


def score_color(scores: Tensor) -> Tensor:
    """RGB ``[N, 3]`` float colours of probabilities ``scores [N]`` on ``SCORE_RAMP`` (linear between stops)."""
    ramp = torch.tensor(SCORE_RAMP, dtype=torch.float32)
    pos = scores.detach().cpu().float().clamp(0, 1) * (len(SCORE_RAMP) - 1)
    low = pos.floor().long().clamp(max=len(SCORE_RAMP) - 2)
    frac = (pos - low)[:, None]
    return ramp[low] * (1 - frac) + ramp[low + 1] * frac


def draw_soft_scores(image: Tensor, targets: Targets, anchor: Tensor, score: Tensor, num_box: int,
                     pad_size: Sequence[int], anchors: AnchorLayout, class_names: Optional[Sequence[str]] = None,
                     box_width: int = 3, zoom: int = 1) -> Tensor:
    """The anchors of a soft record drawn on the view: ``anchor [N]`` own-grid indices (the first ``num_box``
    the box-KD anchors), ``score [N]`` their top stored teacher probability. Coarse levels are painted
    first, so the marks of finer levels at a shared centre stay visible. GT boxes as in ``draw_assignment``."""
    _check_image(image)
    boxes = targets.boxes.detach().cpu().float().reshape(-1, 4)
    labels = targets.labels.detach().cpu().tolist()
    colors = palette(boxes.shape[0])
    text = [f"gt {g}: {class_text(class_names, int(labels[g]))}" for g in range(boxes.shape[0])]
    canvas = _outlines(enlarge(image, zoom), boxes * zoom, colors, box_width).float()
    centres, levels = _zoomed_centres(anchor, pad_size, anchors, zoom)
    score = score.detach().cpu().float().reshape(-1)
    rims = torch.tensor(RIM, dtype=torch.float32).expand(len(score), 3).clone()
    rims[:num_box] = torch.tensor(BOX_KD_RIM, dtype=torch.float32)
    fills = score_color(score)
    halves = mark_half_sizes(anchors.strides)
    for level in reversed(range(anchors.num_levels)):
        sel = levels == level
        _paint_squares(canvas, centres[sel], rims[sel], halves[level] + 1)
        _paint_squares(canvas, centres[sel], fills[sel], halves[level])
    return _tags(canvas.round().clamp(0, 255).to(torch.uint8), boxes * zoom, text, colors, below=True)


def format_summary(rows: Sequence[GTSummary], class_names: Optional[Sequence[str]] = None) -> list[str]:
    """The legend of an assignment picture as a table: per GT its class, colour, positives, candidates and box
    (view pixels, one decimal); then the totals."""
    names = [class_text(class_names, r.label) if class_names is not None else r.name for r in rows]
    width = max([len(n) for n in names] + [5])
    head = f"{'gt':>3}  {'class':<{width}}  {'colour':<7}  {'positives':>9}  {'candidates':>10}  box x1, y1, x2, y2"
    lines = [head] + [
        f"{r.gt:>3}  {n:<{width}}  {hex_color(r.color)}  {r.positives:>9}  {r.candidates:>10}  "
        + ", ".join(f"{v:.1f}" for v in r.box)
        for r, n in zip(rows, names)
    ]
    pos, cand = sum(r.positives for r in rows), sum(r.candidates for r in rows)
    lines.append(f"{'all':>3}  {plural(len(rows), 'GT'):<{width}}  {'':<7}  {pos:>9}  {cand:>10}")
    return lines


# -- output --------------------------------------------------------------------------------------
def write_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Encode ``image`` (uint8 ``[3, H, W]``) as PNG at ``path``, atomically (aside, then renamed)."""
    _check_image(image)
    path = Path(path)
    with quiet_torchvision_io():
        data = encode_png(image.cpu().contiguous())
    with atomic_write(path, "wb", what="image") as f:
        f.write(data.numpy().tobytes())
    return path


def _box_tuple(box: Tensor) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (round(float(v), 1) for v in box)
    return x1, y1, x2, y2
