"""``lad show`` (a detector's detections on one image) and ``lad show-labels`` (a cached teacher assignment)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Optional

import click

from lad_pipeline.errors import LadError

from .options import device_option, overrides_option, parse_scale

if TYPE_CHECKING:
    from lad_pipeline.types import ViewKey

VARIANTS = ("identity", "hflip")


def _scale_text(scale) -> str:
    return f"{scale[0]}x{scale[1]}"


@click.command("show")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Detector checkpoint.")
@click.option("--onnx", type=click.Path(dir_okay=False), metavar="MODEL.onnx",
              help="Detector graph of lad export (instead of --checkpoint), run by onnxruntime.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Model config (default: the one embedded in the checkpoint).")
@click.option("--image-id", required=True, type=int, help="COCO image id to run on.")
@click.option("--ann", required=True, type=click.Path(dir_okay=False), help="COCO annotation file listing the image.")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image directory.")
@click.option("--score-thr", default=0.3, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Draw detections scoring above this.")
@device_option
@click.option("--network", type=click.IntRange(1, 2),
              help="Which detector of a CoLAD checkpoint (default: the config's colad.inference_network).")
@click.option("--out", type=click.Path(dir_okay=False), metavar="OUT.png", help="Output PNG (default: show_<id>.png).")
@click.option("--zoom", type=click.IntRange(1, 16),
              help="Draw on the image enlarged this many times (default: small images, e.g. the toy digits, are "
                   "enlarged to about 512 px; labels keep their size).")
@click.option("--gt", "show_gt", is_flag=True, help="Also outline the image's ground-truth boxes (white).")
@overrides_option("test.nms_iou=0.5")
def show_command(checkpoint: Optional[str], onnx: Optional[str], config_path: Optional[str], image_id: int, ann: str,
                 images: str, score_thr: float, device: Optional[str], network: Optional[int], out: Optional[str],
                 zoom: Optional[int], show_gt: bool, overrides: tuple[str, ...]) -> None:
    """Draw a detector's detections on one image (the unflipped view at the first configured scale,
    boxes in original pixels) and write a PNG with a title and legend underneath. Of detections that overlap
    (IoU > 0.5, any class) only the highest-scoring one is drawn; the title says how many were left out."""
    import torch

    from lad_pipeline.data import CocoViews, read_image
    from lad_pipeline.evaluate.predictor import Predictor
    from lad_pipeline.runtime.distributed import resolve_device
    from lad_pipeline.types import Detections, ViewKey
    from lad_pipeline.visualize import (
        GT_COLOR,
        add_caption,
        auto_zoom,
        class_text,
        color,
        display_order,
        draw_detections,
        draw_outlines,
        enlarge,
        plural,
        write_png,
    )

    dev = resolve_device(device)
    if (checkpoint is None) == (onnx is None):
        raise click.UsageError("give exactly one of --checkpoint and --onnx")
    if onnx is not None and (config_path is not None or network is not None or overrides):
        raise click.UsageError("--config, --network and --set go with --checkpoint; a graph records its own config")
    if onnx is not None:
        predictor = Predictor.from_onnx(onnx, providers=["CPUExecutionProvider"] if dev.type == "cpu" else None)
    else:
        assert checkpoint is not None
        predictor = Predictor.from_checkpoint(checkpoint, config_path, overrides, device=dev, network=network)
    scale = predictor.config.data.scales[0]
    dataset = CocoViews(ann, images, scales=[scale], flip_prob=0.0, train=False)
    dataset.check_num_classes(predictor.num_classes)
    view = dataset.load_view(ViewKey(image_id, dataset.scales[0], False))  # LadError for an unknown id
    # a --score-thr below the test threshold must see the boxes it asks for
    test_thr = predictor.config.test.score_thr
    dets = predictor.predict_views([view.image], [view.view_size], [view.scale_factor],
                                   score_thr=min(test_thr, score_thr))[0]
    original = read_image(dataset.image_path(image_id))
    zoom = zoom or auto_zoom(original.shape[1], original.shape[2])
    picture = enlarge(original, zoom)  # the pixels, not the detector's input: the boxes scale with them
    order, hidden = display_order(dets, score_thr)
    shown = Detections(dets.boxes[order] * zoom, dets.scores[order], dets.labels[order])
    legend = []
    if show_gt:
        sx, sy = view.scale_factor  # view pixels -> original pixels
        gt = view.targets.boxes / torch.tensor([sx, sy, sx, sy])
        picture = draw_outlines(picture, gt * zoom, GT_COLOR)
        legend.append((GT_COLOR, "ground truth"))
    drawn = draw_detections(picture, shown, dataset.class_names, score_thr)
    per_class = Counter(shown.labels.tolist())
    legend += [(color(k), f"{class_text(dataset.class_names, k)} ({n})") for k, n in sorted(per_class.items())]
    title = f"image {image_id}: {plural(len(order), 'detection')} with score > {score_thr:g}"
    if hidden:
        title += f"; {hidden} more, each under a higher-scoring one, not drawn"
    picture = add_caption(drawn, title, legend)
    path = write_png(picture, out or f"show_{image_id}.png")
    detail = "; drawn: " + ", ".join(text for c, text in legend if c != GT_COLOR) if len(order) else ""
    click.echo(f"wrote {path} ({_size_text(picture, original.shape[1:], 'image', zoom)}): {title}{detail}")


def _size_text(picture, source_size, what: str, zoom: int) -> str:
    """The written picture's size, then what it shows: "556x532 px: the 139x121 px image at zoom 4, captioned"."""
    (h, w), (H, W) = tuple(source_size), picture.shape[1:]
    return f"{W}x{H} px: the {w}x{h} px {what} at zoom {zoom}, captioned"


def _missing_view(cache, key: ViewKey) -> str:
    """One line: the view that is missing and what the cache holds instead."""
    attrs = cache.attrs
    variants = ", ".join(attrs.get("variants", [])) or "?"
    scales = ", ".join(_scale_text(s) for s in attrs.get("scales", [])) or "?"
    same_image = sorted(k for k in cache.keys() if k.image_id == key.image_id)
    want = f"image {key.image_id} at scale {_scale_text(key.scale)}, variant {key.variant()}"
    if same_image:
        have = ", ".join(f"{k.variant()} {_scale_text(k.scale)}" for k in same_image)
        held = f"for image {key.image_id} it holds {have}"
    else:
        num_images = len({k.image_id for k in cache.keys()})
        held = f"it holds no view of image {key.image_id} ({len(cache)} views of {num_images} images)"
    return f"label cache {cache.path} has no view of {want}; {held}; variants: {variants}; scales: {scales}"


@click.command("show-labels")
@click.option("--cache", "cache_path", required=True, metavar="LABELS.zarr", help="Label cache (lad cache-labels).")
@click.option("--image-id", required=True, type=int, help="COCO image id.")
@click.option("--ann", required=True, type=click.Path(dir_okay=False),
              help="COCO annotation file the cache was made from (for pixels and class names).")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image directory.")
@click.option("--variant", type=click.Choice(VARIANTS), default="identity", show_default=True,
              help="Which cached view: unflipped or horizontally flipped.")
@click.option("--scale", callback=parse_scale, metavar="LONGxSHORT",
              help="Target scale of the cached view (default: the cache's first scale).")
@click.option("--soft", is_flag=True,
              help="Draw the teacher's soft labels instead: stored anchors coloured by their top teacher probability.")
@click.option("--out", type=click.Path(dir_okay=False), metavar="OUT.png",
              help="Output PNG (default: labels_<id>_<variant>_<long>x<short>.png, soft_... with --soft).")
@click.option("--zoom", type=click.IntRange(1, 16),
              help="Draw on the view enlarged this many times (default: small views are enlarged to about 512 px; "
                   "marks and labels keep their size).")
def show_labels_command(cache_path: str, image_id: int, ann: str, images: str, variant: str,
                        scale: Optional[tuple[int, int]], soft: bool, out: Optional[str], zoom: Optional[int]) -> None:
    """Draw what the teacher taught on one cached view: GT boxes, positive anchors (filled squares in
    their GT's colour, bigger for coarser FPN levels) and rejected candidates (faint hollow squares), with
    a title and legend underneath.
    With --soft (a cache made with lad cache-labels --soft): the anchors its soft record stores, coloured
    by their top teacher probability (dark blue 0 .. green .. yellow 1), box-KD anchors with a white rim."""
    from lad_pipeline.cache import LabelCache, annotation_fingerprint
    from lad_pipeline.data import CocoViews
    from lad_pipeline.types import ViewKey
    from lad_pipeline.visualize import (
        add_caption,
        auto_zoom,
        class_text,
        draw_assignment,
        format_summary,
        plural,
        write_png,
    )

    cache = LabelCache.open(cache_path)
    if soft and not cache.has_soft:
        raise LadError(f"label cache {cache_path} has no soft labels; make one with lad cache-labels --soft")
    if scale is None:
        scales = cache.attrs.get("scales") or []
        if not scales:
            raise LadError(f"label cache {cache_path} records no scales; pass --scale LONGxSHORT")
        scale = (int(scales[0][0]), int(scales[0][1]))
    key = ViewKey(image_id, scale, variant == "hflip")
    cached = cache.get(key)
    if cached is None:
        raise LadError(_missing_view(cache, key))

    dataset = CocoViews(ann, images, scales=[scale], flip_prob=0.0, train=False)
    view = dataset.load_view(key)  # the same resize and flip as the teacher's view; LadError for an unknown id
    if tuple(view.view_size) != tuple(cached.view_size):
        raise LadError(f"image {image_id} of {ann} resizes to {view.view_size[1]}x{view.view_size[0]} at scale "
                       f"{_scale_text(scale)} but the cached view is {cached.view_size[1]}x{cached.view_size[0]}: "
                       "the cache was made from other images; pass the --ann and --images it was made from")
    made_from = cache.attrs.get("annotation_fingerprint")
    if made_from and made_from != annotation_fingerprint(ann):
        click.echo(f"warning: {ann} is not the annotation file the cache was made from (fingerprints differ); "
                   "boxes and anchors are drawn from the cache, pixels and class names from it", err=True)
    zoom = zoom or auto_zoom(*cached.view_size)
    if soft:
        _show_soft(cached, view.image, cache.layout.anchors, dataset.class_names,
                   out or f"soft_{image_id}_{variant}_{_scale_text(scale)}.png", variant, scale, zoom)
        return
    image, rows = draw_assignment(view.image, cached.targets, cached.assignment, cached.pad_size,
                                  cache.layout.anchors, dataset.class_names, zoom=zoom)
    names = dataset.class_names
    title = (f"image {image_id}, {variant}, scale {_scale_text(scale)}: {plural(len(rows), 'GT')}, "
             f"{plural(cached.assignment.num_pos, 'positive anchor')}, "
             f"{plural(int((~cached.assignment.cand_pos).sum()), 'rejected candidate')}")
    legend = [(r.color, f"gt {r.gt}: {class_text(names, r.label)}, {r.positives}/{r.candidates} positive")
              for r in rows]
    key_lines = ["filled squares: positive anchors in their GT's colour (bigger = coarser FPN level)",
                 "faint hollow squares: candidates the teacher rejected"]
    picture = add_caption(image, title, legend, key_lines)
    path = write_png(picture, out or f"labels_{image_id}_{variant}_{_scale_text(scale)}.png")
    click.echo(f"wrote {path} ({_size_text(picture, cached.view_size, 'view', zoom)}): {title}")
    for line in [*key_lines, *format_summary(rows, names)]:
        click.echo(line)


def _show_soft(cached, image, anchors, class_names, out: str, variant: str, scale, zoom: int) -> None:
    """Write the soft-label picture of one cached view and print what it shows."""
    import numpy as np
    import torch

    from lad_pipeline.visualize import SCORE_RAMP, add_caption, class_text, draw_soft_scores, plural, write_png

    record = cached.soft
    counts = record.cls_count.astype(np.int64)
    first = np.cumsum(counts) - counts
    top = torch.from_numpy(record.cls_logit[first].astype(np.float32)).sigmoid()  # each anchor's largest first
    drawn = draw_soft_scores(image, cached.targets, torch.from_numpy(record.anchor.astype("int64")), top,
                             record.num_box, cached.pad_size, anchors, class_names, zoom=zoom)
    title = (f"image {cached.key.image_id}, {variant}, scale {_scale_text(scale)}: "
             f"{plural(len(record.anchor), 'stored anchor')} ({record.num_box} box-KD), {record.nbytes} bytes")
    ramp = [(c, f"p {p:g}") for c, p in zip(SCORE_RAMP, (0, 0.25, 0.5, 0.75, 1))]
    key_lines = ["squares: stored anchors coloured by their top teacher probability (bigger = coarser FPN "
                 "level); white rim: box-KD anchors"]
    picture = add_caption(drawn, title, ramp, key_lines)
    path = write_png(picture, out)
    click.echo(f"wrote {path} ({_size_text(picture, cached.view_size, 'view', zoom)}): {title}")
    click.echo(key_lines[0])
    if len(top):
        q = torch.quantile(top, torch.tensor([0.0, 0.5, 0.9, 1.0])).tolist()
        classes = Counter(int(c) for c in record.cls_class[first].tolist())
        names = ", ".join(f"{class_text(class_names, c)} ({n})" for c, n in classes.most_common(5))
        click.echo(f"top probability min/p50/p90/max {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}/{q[3]:.3f}; "
                   f"top classes: {names}")
