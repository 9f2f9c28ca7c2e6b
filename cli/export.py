"""``lad export``: a trained detector as an ONNX graph (the library is imported when the command runs)."""
from __future__ import annotations

from typing import Optional

import click

from .options import path_option


@click.command("export")
@path_option("checkpoint", "--checkpoint", "CKPT", "Checkpoint: ours or an mmdetection file.",
             type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="MODEL.onnx",
              help="ONNX file to write.")
@click.option("--network", type=click.IntRange(1, 2),
              help="Which detector of a CoLAD checkpoint (required for one; lad train-colad).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Model config (default: the one embedded in the checkpoint; needed for mmdetection files).")
def export_command(checkpoint: str, out: str, network: Optional[int], config_path: Optional[str]) -> None:
    """Export the detector of a checkpoint (ours or mmdetection's) to ONNX: backbone, FPN, head, box decoding and
    the PAA score, with dynamic batch, height and width. The graph outputs every anchor's boxes and scores;
    NMS and score voting stay in lad (lad eval --onnx, lad show --onnx)."""
    from lad_pipeline.export import export_onnx

    report = export_onnx(checkpoint, out, network=network, config_path=config_path)
    which = f" network {report.network}," if report.network else ""
    click.echo(f"wrote {report.path} ({report.size_bytes / 2**20:.1f} MiB):{which} {report.backbone}, "
               f"{report.num_classes} classes")
    click.echo(f"onnxruntime vs PyTorch on a check batch: boxes within {report.max_box_error:.1e} px, "
               f"scores within {report.max_score_error:.1e} relative")
