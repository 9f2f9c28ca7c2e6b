"""Shared helpers of the benchmarks: timing, device choice, result files, small datasets."""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    """The CPU's model name and the vector instructions PyTorch's kernels use ("AMD EPYC (AVX2)"): results and
    timings depend on both, so every published figure names them."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def wall_time(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (CUDA synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall_time(fn) for _ in range(repeats))


def write_result(name: str, result: dict) -> Path:
    path = Path(__file__).resolve().parent / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def subset_dataset(source: Path, out: Path, n_images: int) -> tuple[Path, Path, int]:
    """The first ``n_images`` images with a usable box, every category kept: (annotations, images, classes)."""
    data = json.loads((source / "annotations.json").read_text())
    with_box = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0) and a["bbox"][2] >= 1
                and a["bbox"][3] >= 1}
    images = [im for im in data["images"] if im["id"] in with_box][:n_images]
    ids = {im["id"] for im in images}
    subset = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    ann = out / "annotations.json"
    ann.write_text(json.dumps(subset))
    return ann, source / "images", len(data["categories"])


def toy_dataset(out: Path, n_images: int) -> tuple[Path, Path, int]:
    from lad_pipeline.data.toy import make_toy_dataset

    root = make_toy_dataset(out / "toy", n_images, 0, seed=0)
    return root / "train" / "annotations.json", root / "train" / "images", 10


def step_bench_args(doc: str, iters: int = 5,
                    extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options of the training-step benchmarks (bench/train.py, colad.py, solad.py) and a benchmark's own
    (``extra`` adds them); quiet logging, seed 0."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--scale", type=int, default=320, help="view scale (long = short), e.g. 320 -> 320x240")
    parser.add_argument("--batch", type=int, default=2, help="views per step")
    parser.add_argument("--iters", type=int, default=iters, help="timed iterations per mode (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per mode first")
    parser.add_argument("--images", type=int, default=14, help="images of the dataset subset")
    parser.add_argument("--data", choices=("auto", "coco128", "toy"), default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(0)
    return args


def step_bench_data(args: argparse.Namespace, prefix: str) -> tuple[Path, tuple[Path, Path, int], str]:
    """A work folder and the benchmark's dataset in it: coco128 (``LAD_COCO128``, default
    ../shared/data/coco128) when present or asked for, else the toy digits. Returns (work, (annotations,
    images, classes), a name for the report)."""
    repo = Path(__file__).resolve().parents[1]
    coco128 = Path(os.environ.get("LAD_COCO128", repo.parent / "shared" / "data" / "coco128"))
    use_coco = args.data == "coco128" or (args.data == "auto" and (coco128 / "annotations.json").is_file())
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if use_coco:
        return work, subset_dataset(coco128, work, args.images), f"coco128 ({args.images} images)"
    return work, toy_dataset(work, args.images), f"toy digits ({args.images} images)"


def cached_step_batches(config, store: Path, ann: Path, images: Path, args: argparse.Namespace):
    """The config's training dataset, its label cache at ``store`` (decoded up front) and the first
    ``warmup + iters`` full batches of epoch 0, preloaded so that no timing includes data loading. As in
    training, each batch carries its cached labels looked up where it was collated (``BatchLookup``: the
    DataLoader workers); a source that does not read the cache ignores them. Returns (dataset, cache, batches,
    the distinct view sizes (h, w) of those batches)."""
    from lad_pipeline.data import CocoViews, make_loader
    from lad_pipeline.train.label_sources import BatchLookup
    from lad_pipeline.train.recipes import open_cache_for

    dataset = CocoViews(ann, images, scales=config.data.scales, flip_prob=config.data.flip_prob,
                        seed=config.train.seed)
    cache = open_cache_for(config, str(store), dataset)
    cache.load_all()
    n_batches = args.warmup + args.iters
    batches = list(make_loader(dataset, dataset.train_keys(0)[:n_batches * args.batch], args.batch, 0,
                               prepare=BatchLookup(cache)))
    batches = [b for b in batches if len(b) == args.batch][:n_batches]
    return dataset, cache, batches, sorted({(v[0], v[1]) for b in batches for v in b.view_sizes})


def interleaved_step_times(trainers: dict, batches: list, iters: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each trainer's ``step`` on the same preloaded batches; the modes take turns, one step each per
    round, so that a change of machine load touches them all alike, and the order turns by one mode each round,
    so that no mode always runs first or always follows the same one (that alone moved a ratio of two identical
    modes by 5 % here). The first ``warmup`` rounds are not kept."""
    from itertools import cycle

    feeds = {mode: cycle(batches) for mode in trainers}
    order = list(trainers)

    def step(mode: str) -> Callable[[], object]:
        trainer = trainers[mode]
        return lambda: (trainer.step(next(feeds[mode])), setattr(trainer, "iteration", trainer.iteration + 1))

    times: dict[str, list[float]] = {mode: [] for mode in trainers}
    for n in range(warmup + iters):
        turn = n % len(order)
        for mode in order[turn:] + order[:turn]:
            seconds = timeit(step(mode), repeats=1, warmup=0)
            if n >= warmup:
                times[mode].append(seconds)
    return times


def source_phase_times(trainers: dict, batches: list, steps: int) -> dict[str, dict[str, float]]:
    """Where a step's label-source time goes: median seconds of each trainer's ``source.labels`` and
    ``source.loss`` over ``steps`` more steps, taken after the timed rounds (on CUDA the device is synchronised
    around each call, which the timed steps must not be)."""
    out = {}
    for mode, trainer in trainers.items():
        source = trainer.source
        spent: dict[str, list[float]] = {"labels": [], "loss": []}

        def timed(phase: str, fn: Callable) -> Callable:
            def call(*args):
                result = None

                def run() -> None:
                    nonlocal result
                    result = fn(*args)
                spent[phase].append(wall_time(run))
                return result
            return call

        source.labels, source.loss = timed("labels", source.labels), timed("loss", source.loss)
        try:
            for batch in batches[:steps]:
                trainer.step(batch)
        finally:
            del source.labels, source.loss  # back to the class's methods
        out[mode] = {phase: statistics.median(v) for phase, v in spent.items()}
    return out


def round_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``numerator[i] / denominator[i]`` of interleaved timings.

    A round's modes run back to back, so each round's ratio is taken at one machine speed; a ratio of the
    modes' medians mixes speeds when the host drifts during the run (seen: 40 % within minutes)."""
    rounds = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
    median = statistics.median(rounds)
    q1, _, q3 = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else [median] * 3
    return {"median": median, "q1": q1, "q3": q3}


def report_ratios(times: dict[str, list[float]], ratios: dict[str, str]) -> dict[str, dict[str, float]]:
    """``round_ratio`` of each named ratio of modes, one line each. ``"ab"`` is a over b; ``"abc"`` is a over
    the sum of b and c (one CoLAD step against two plain steps)."""
    out = {}
    for name, (x, *ys) in ratios.items():
        per_round = [sum(step) for step in zip(*(times[y] for y in ys))]
        r = out[name] = round_ratio(times[x], per_round)
        of_medians = statistics.median(times[x]) / sum(statistics.median(times[y]) for y in ys)
        over = ys[0] if len(ys) == 1 else f"({'+'.join(ys)})"
        print(f"{x}/{over:<5} {name:<29}= {r['median']:.3f} "
              f"(per round; quartiles {r['q1']:.3f}-{r['q3']:.3f}, ratio of the medians {of_medians:.3f})")
    return out
