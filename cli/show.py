"""``lad show`` (a detector's detections on one image) and ``lad show-labels`` (a cached teacher assignment)."""
from __future__ import annotations

from collections import Counter
from typing import Optional

import click

from lad_pipeline.errors import LadError
from lad_pipeline.types import ViewKey

from .options import overrides_option, parse_scale

VARIANTS = ("identity", "hflip")


def _scale_text(scale) -> str:
    return f"{scale[0]}x{scale[1]}"


@click.command("show")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Detector checkpoint.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Model config (default: the one embedded in the checkpoint).")
@click.option("--image-id", required=True, type=int, help="COCO image id to run on.")
@click.option("--ann", required=True, type=click.Path(dir_okay=False), help="COCO annotation file listing the image.")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image directory.")
@click.option("--score-thr", default=0.3, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Draw detections scoring above this.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--network", type=click.IntRange(1, 2),
              help="Which detector of a CoLAD checkpoint (default: the config's colad.inference_network).")
@click.option("--out", type=click.Path(dir_okay=False), metavar="OUT.png", help="Output PNG (default: show_<id>.png).")
@click.option("--zoom", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Draw on the image enlarged this many times (small images, e.g. the toy digits).")
@overrides_option("test.nms_iou=0.5")
def show_command(checkpoint: str, config_path: Optional[str], image_id: int, ann: str, images: str, score_thr: float,
                 device: Optional[str], network: Optional[int], out: Optional[str], zoom: int,
                 overrides: tuple[str, ...]) -> None:
    """Draw a detector's detections on one image (the unflipped view at the first configured scale,
    boxes in original pixels) and write a PNG."""
    import torch

    from lad_pipeline.data import CocoViews, read_image
    from lad_pipeline.evaluate.predictor import Predictor
    from lad_pipeline.visualize import draw_detections, write_png

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a torch device (cpu, cuda, cuda:1, ...)",
                                 param_hint="--device") from None
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
    if zoom > 1:  # enlarge the pixels, not the detector's input: the boxes scale with them
        original = original.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
        dets = dets._replace(boxes=dets.boxes * zoom)
    drawn = draw_detections(original, dets, dataset.class_names, score_thr)
    path = write_png(drawn, out or f"show_{image_id}.png")
    kept = dets.labels[dets.scores > score_thr].tolist()
    per_class = Counter(dataset.class_names[k] for k in kept)
    detail = ": " + ", ".join(f"{name} {n}" for name, n in per_class.most_common()) if kept else ""
    click.echo(f"wrote {path} ({original.shape[2]}x{original.shape[1]}, image {image_id}): "
               f"{len(kept)} detections with score > {score_thr:g} drawn{detail}")


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
def show_labels_command(cache_path: str, image_id: int, ann: str, images: str, variant: str,
                        scale: Optional[tuple[int, int]], soft: bool, out: Optional[str]) -> None:
    """Draw what the teacher taught on one cached view: GT boxes, positive anchors (filled squares in
    their GT's colour, bigger for coarser FPN levels) and rejected candidates (faint hollow squares).
    With --soft (a cache made with lad cache-labels --soft): the anchors its soft record stores, coloured
    by their top teacher probability (dark blue 0 .. green .. yellow 1), box-KD anchors with a white rim."""
    from lad_pipeline.cache import LabelCache, annotation_fingerprint
    from lad_pipeline.data import CocoViews
    from lad_pipeline.visualize import draw_assignment, format_summary, write_png

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
    if soft:
        _show_soft(cached, view.image, cache.layout.anchors, dataset.class_names,
                   out or f"soft_{image_id}_{variant}_{_scale_text(scale)}.png", variant, scale)
        return
    image, rows = draw_assignment(view.image, cached.targets, cached.assignment, cached.pad_size,
                                  cache.layout.anchors, dataset.class_names)
    path = write_png(image, out or f"labels_{image_id}_{variant}_{_scale_text(scale)}.png")
    h, w = cached.view_size
    click.echo(f"wrote {path} ({w}x{h}, image {image_id}, {variant}, scale {_scale_text(scale)}): "
               f"{len(rows)} GTs, {cached.assignment.num_pos} positive anchors, "
               f"{int((~cached.assignment.cand_pos).sum())} rejected candidates")
    click.echo("filled squares: positives, in their GT's colour (bigger = coarser FPN level); "
               "faint hollow squares: rejected candidates")
    for line in format_summary(rows):
        click.echo(line)


def _show_soft(cached, image, anchors, class_names, out: str, variant: str, scale) -> None:
    """Write the soft-label picture of one cached view and print what it shows."""
    import numpy as np
    import torch

    from lad_pipeline.visualize import draw_soft_scores, write_png

    record = cached.soft
    counts = record.cls_count.astype(np.int64)
    first = np.cumsum(counts) - counts
    top = torch.from_numpy(record.cls_logit[first].astype(np.float32)).sigmoid()  # each anchor's largest first
    drawn = draw_soft_scores(image, cached.targets, torch.from_numpy(record.anchor.astype("int64")), top,
                             record.num_box, cached.pad_size, anchors, class_names)
    path = write_png(drawn, out)
    h, w = cached.view_size
    click.echo(f"wrote {path} ({w}x{h}, image {cached.key.image_id}, {variant}, scale {_scale_text(scale)}): "
               f"{len(record.anchor)} stored anchors ({record.num_box} box-KD), soft record {record.nbytes} bytes")
    click.echo("squares: stored anchors coloured by their top teacher probability (dark blue 0, green 0.5, "
               "yellow 1; bigger = coarser FPN level); white rim: box-KD anchors")
    if len(top):
        q = torch.quantile(top, torch.tensor([0.0, 0.5, 0.9, 1.0])).tolist()
        classes = Counter(int(c) for c in record.cls_class[first].tolist())
        names = ", ".join(f"{class_names[c] if class_names and c < len(class_names) else c} {n}"
                          for c, n in classes.most_common(5))
        click.echo(f"top probability min/p50/p90/max {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}/{q[3]:.3f}; "
                   f"top classes: {names}")
