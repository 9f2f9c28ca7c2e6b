"""``lad checkpoint-info`` (does a checkpoint load into its detectors, what is in it) and ``lad export-network``."""
from __future__ import annotations

import click

from .options import overrides_option, path_option


@click.command("checkpoint-info")
@path_option("checkpoint", "--checkpoint", "CKPT", "Checkpoint: ours or an mmdetection file.",
             type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(), help="Model config (needed for mmdetection files).")
@click.option("--teacher", is_flag=True, help="Build the config's teacher model instead of its student.")
@overrides_option("model.num_classes=10")
def checkpoint_info_command(checkpoint: str, config_path: str | None, teacher: bool,
                            overrides: tuple[str, ...]) -> None:
    """Load a checkpoint (ours or mmdetection's) into its detector and summarise it."""
    from lad_pipeline.checkpoint import Checkpoint, first_non_finite
    from lad_pipeline.errors import LadError

    ckpt = Checkpoint.read(checkpoint)
    model, config = ckpt.resolve(config_path, overrides, teacher=teacher, network=1,
                                 require_finite=False)  # reported below instead
    click.echo(f"checkpoint   {checkpoint}")
    click.echo(f"format       {ckpt.format}")
    click.echo(f"sha256       {ckpt.sha256}")
    networks = [model]
    if len(ckpt.networks) == 1:
        click.echo(f"model        {_describe(model, config.teacher.model if teacher else config.model)}")
    else:  # CoLAD: both networks are loaded, so both are checked
        network2, config2 = ckpt.resolve(config_path, overrides, network=2, require_finite=False)
        networks.append(network2)
        click.echo(f"network 1    {_describe(model, config.model)}")
        click.echo(f"network 2    {_describe(network2, config2.model)}")
        click.echo(f"inference    network {config.colad.inference_network} (colad.inference_network)")
    if "iteration" in ckpt.contents:
        click.echo(f"iteration    {ckpt.contents['iteration']}")
    click.echo("loads        all keys, no mismatches")
    bad = next(filter(None, (first_non_finite(net.state_dict()) for net in networks)), None)
    click.echo(f"finite       {'no, first: ' + bad if bad else 'yes'}")
    if bad:
        raise LadError(f"checkpoint {checkpoint} holds non-finite weights, first in tensor {bad}: eval, show, "
                       f"cache-labels, init_from and teacher use refuse it")


def _describe(model, model_cfg) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{model_cfg.backbone}, {model_cfg.num_classes} classes, {params / 1e6:.2f} M parameters"


@click.command("export-network")
@path_option("checkpoint", "--checkpoint", "CKPT", "A checkpoint of lad train-colad (two networks).",
             type=click.Path(dir_okay=False))
@click.option("--network", required=True, type=click.IntRange(1, 2), help="Which detector of the checkpoint.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="OUT.pth",
              help="Plain detector checkpoint to write (a teacher for cache-labels, or for eval/show).")
def export_network_command(checkpoint: str, network: int, out: str) -> None:
    """Write one network of a checkpoint (e.g. network 2 of a lad train-colad run) as a plain detector."""
    from lad_pipeline.checkpoint import export_network

    config = export_network(checkpoint, out, network)
    click.echo(f"wrote {out}: network {network} ({config.model.backbone}, {config.model.num_classes} classes)")
