"""Training curves of one or more runs: loss terms and validation AP against iterations, runs overlaid.

Reads each run directory's ``metrics.jsonl`` (training records carry ``loss*`` terms, validation records
``val_AP`` ...; ``train.eval_every``) and draws one panel per loss term plus one for validation AP, with
matplotlib's Agg backend (no display needed)::

    plot_runs(["runs/student_paa", "runs/student_lad"], "curves.png")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .errors import LadError
from .runtime.atomic import atomic_write


def read_metrics(run: str | Path) -> list[dict]:
    """The records of ``run/metrics.jsonl`` in order; for an iteration logged twice (a resumed run repeats the
    iterations after its last checkpoint) the later record of the same kind wins."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise LadError(f"{path} not found: {run} is not a training run directory",
                       hint="RUN must be a run directory of lad train-teacher/-student/-colad")
    lines = path.read_text().splitlines()
    records: dict[tuple[bool, int], dict] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while writing its last line
                break
            raise LadError(f"{path}, line {number}: not JSON; is it a metrics.jsonl written by lad?") from None
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records[(_is_val(record), record["iter"])] = record
    return [records[k] for k in sorted(records, key=lambda k: (k[1], k[0]))]


def _is_val(record: dict) -> bool:
    return any(k.startswith("val_") for k in record)


def _smooth(values: list[float]) -> list[float]:
    """A centred moving average over about 1/15 of the points (the raw values are one batch each, noisy)."""
    half = len(values) // 30
    return [sum(values[max(i - half, 0):i + half + 1]) / len(values[max(i - half, 0):i + half + 1])
            for i in range(len(values))]


def curves(records: Sequence[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Every ``loss*`` and ``val_*AP*`` series of a run's records: name -> (iterations, values)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            wanted = name.startswith("loss") or (name.startswith("val_") and "AP" in name)
            if wanted and isinstance(value, (int, float)) and value == value:  # NaN (a skipped step) is a gap
                xs, ys = series.setdefault(name, ([], []))
                xs.append(record["iter"])
                ys.append(float(value))
    return series


def plot_runs(runs: Sequence[str | Path], out: str | Path, labels: Optional[Sequence[str]] = None,
              val_stats: Sequence[str] = ("AP",)) -> Path:
    """Write a PNG of the runs' loss terms (one panel each) and validation ``val_stats`` (one panel each, every
    network of a run); returns ``out``. ``labels`` name the runs in the legend (default: directory names)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise LadError("give at least one run directory to plot")
    labels = list(labels) if labels else _names(runs)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    data = [curves(read_metrics(run)) for run in runs]
    losses = _ordered(name for d in data for name in d if name.startswith("loss"))
    vals = [s for s in val_stats if any(_val_names(d, s) for d in data)]
    panels = [(name, name, False) for name in losses] + [(f"val {s}", s, True) for s in vals]
    if not panels:
        raise LadError(f"no loss or validation values in {', '.join(str(r) for r in runs)}: nothing to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, key, is_val) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (series, label) in enumerate(zip(data, labels)):
            color = f"C{j % 10}"
            if is_val:
                for k, name in enumerate(_val_names(series, key)):
                    xs, ys = series[name]
                    network = name[len("val_"):-len(key)].rstrip("_")
                    ax.plot(xs, ys, marker="o", markersize=3, color=color, linestyle=("-", "--", ":")[k % 3],
                            label=f"{label} ({network})" if network else label)
            elif key in series:
                xs, ys = series[key]
                smooth = _smooth(ys)
                if smooth != ys:
                    ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth, color=color, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if is_val:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    out = Path(out)
    with atomic_write(out, "wb", what="plot") as f:
        fig.savefig(f, format="png")
    return out


def _val_names(series: dict, stat: str) -> list[str]:
    """``val_AP`` (the trained model) first, then ``val_<network>_AP`` of a CoLAD run's other network."""
    names = [n for n in series if n.startswith("val_") and (n == f"val_{stat}" or n.endswith(f"_{stat}"))]
    return sorted(names, key=lambda n: (n != f"val_{stat}", n))


def _ordered(names) -> list[str]:
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name, None)
    return sorted(seen, key=lambda n: (n != "loss", n.endswith("_t"), n))


def _names(runs: Sequence[str | Path]) -> list[str]:
    names = [Path(r).resolve().name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]
