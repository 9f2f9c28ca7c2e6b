"""``lad eval``: COCO box metrics of a checkpoint, an exported ONNX graph or a results JSON file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from lad_pipeline.errors import LadError

from .options import device_option, num_workers_option, overrides_option


@click.command("eval")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Detector checkpoint to run on the images.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Model config (with --checkpoint).")
@click.option("--onnx", type=click.Path(dir_okay=False), metavar="MODEL.onnx",
              help="Detector graph of lad export, run by onnxruntime, to run on the images.")
@click.option("--detections", type=click.Path(dir_okay=False), metavar="RESULTS.json",
              help="COCO results file (list of image_id, category_id, bbox, score) to evaluate.")
@click.option("--ann", type=click.Path(dir_okay=False), help="COCO annotation file (ground truth).")
@click.option("--images", type=click.Path(file_okay=False), help="Image directory (with --checkpoint).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (with --checkpoint).")
@num_workers_option
@click.option("--network", type=click.IntRange(1, 2),
              help="Which detector of a CoLAD checkpoint (default: the config's colad.inference_network).")
@click.option("--out", type=click.Path(dir_okay=False), metavar="metrics.json",
              help="Write the metrics as JSON here (default: print only).")
@overrides_option("test.score_thr=0.01")
@device_option
def eval_command(checkpoint: str | None, config_path: str | None, onnx: str | None, detections: str | None,
                 ann: str | None, images: str | None, batch_size: int | None, num_workers: int | None,
                 network: int | None, out: str | None, overrides: tuple[str, ...], device: str | None) -> None:
    """COCO bbox AP of a checkpoint (--checkpoint), an exported graph (--onnx) or a results file (--detections)."""
    if sum(x is not None for x in (checkpoint, onnx, detections)) != 1:
        raise click.UsageError("give exactly one of --checkpoint, --onnx and --detections")
    if onnx is not None and (config_path is not None or network is not None or overrides):
        raise click.UsageError("--config, --network and --set go with --checkpoint; a graph records its own config")
    if out is not None:  # before the work, not after it
        _check_writable(Path(out))
    if detections is not None:
        if ann is None:
            raise click.UsageError("--detections needs --ann, the annotation file the results refer to")
        if overrides:
            raise click.UsageError("--set changes the config of a --checkpoint; a results file has none")
        results: Any = detections
    else:
        results, ann = _inference(checkpoint, config_path, ann, images, batch_size, num_workers, network, onnx,
                                  device, overrides)
        from lad_pipeline.runtime import distributed

        if not distributed.is_main():  # under torchrun every rank infers, rank 0 evaluates and reports
            return
    from lad_pipeline.evaluate.coco_eval import evaluate_coco

    metrics = evaluate_coco(ann, results)
    click.echo(metrics["summary"])
    click.echo(_per_class_table(metrics["per_class_ap"]))
    if out is not None:
        record = {k: v for k, v in metrics.items() if k != "summary"}
        record["ann_file"] = os.path.abspath(str(ann))
        record["source"] = os.path.abspath(str(detections or checkpoint or onnx))
        if network is not None:
            record["network"] = network
        _write_json_atomic(Path(out), record)
        click.echo(f"metrics written to {out}")


def _inference(checkpoint: str | None, config_path: str | None, ann: str | None, images: str | None,
               batch_size: int | None, num_workers: int | None, network: int | None,
               onnx: str | None, device: str | None, overrides: tuple[str, ...]) -> tuple[list[dict], str]:
    """COCO results of the checkpoint (or ONNX graph) and the annotation file they refer to."""
    # imported here: evaluating a results file needs neither the model nor the data pipeline
    from lad_pipeline.evaluate.inference import run_inference

    return run_inference(checkpoint=checkpoint, config=config_path, ann=ann, images=images,
                         batch_size=batch_size, num_workers=num_workers, network=network, onnx=onnx,
                         device=device, overrides=overrides)


def _per_class_table(per_class: dict[str, float | None], columns: int = 3) -> str:
    cells = [(name, "-" if ap is None else f"{ap:.3f}") for name, ap in per_class.items()]
    if not cells:
        return ""
    width = max([len(name) for name, _ in cells] + [len("category")])  # the header fits its column
    header = "  ".join(f"{'category':<{width}} {'AP':>5}" for _ in range(min(columns, len(cells))))
    rows = ["  ".join(f"{name:<{width}} {ap:>5}" for name, ap in cells[i:i + columns])
            for i in range(0, len(cells), columns)]
    return "\n".join([header, *rows])


def _check_writable(path: Path) -> None:
    probe = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise LadError(f"cannot write metrics to {path}: {exc.strerror or exc}") from None


def _write_json_atomic(path: Path, record: dict) -> None:
    from lad_pipeline.runtime.atomic import atomic_write

    # Written aside, then renamed: an interrupted run never leaves a truncated metrics file.
    with atomic_write(path, "w", what="metrics") as f:
        f.write(json.dumps(record, indent=2) + "\n")

