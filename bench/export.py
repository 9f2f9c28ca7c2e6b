"""Per-image latency of an exported graph under onnxruntime (CPU) against the same network in PyTorch eager.

    python bench/export.py [--rounds 20] [--warmup 2] [--models r18,r50]

(a) onnxruntime, (b) PyTorch eager (``torch.inference_mode``), each on the graph's whole work: network, box
decoding against the anchors and the PAA score, batch 1; NMS and score voting are the same Python code after
either and are not timed. Two detectors, random weights, exported by ``lad export``'s library function:
  r18  the toy ResNet-18 (configs/toy_student_r18.toml) on a 128x128 input, the toy data's size;
  r50  PAA R-50 (configs/paa_r50_fpn_1x_coco.toml) on an 800x1344 input (800x1333 padded to 32).
onnxruntime gets as many intra-op threads as torch has. Per model the two runtimes take turns, one image each per
round, and the ratios are the median over rounds of each round's a / b (bench/common.py's ``report_ratios``).
Also reported: the .onnx file sizes. Last line: ``headline: ort_over_torch`` (the R-50 at 800x1333; lower is
better, below 1 means onnxruntime is faster).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, report_ratios, timeit, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lad_pipeline.checkpoint import save_checkpoint  # noqa: E402
from lad_pipeline.config import load_config  # noqa: E402
from lad_pipeline.export import DeployedDetector, OnnxDetector, export_onnx  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402

# name: (config, input [B, 3, H, W], onnxruntime mode letter, PyTorch mode letter)
MODELS = {
    "r18": ("toy_student_r18.toml", (1, 3, 128, 128), "a", "b"),
    "r50": ("paa_r50_fpn_1x_coco.toml", (1, 3, 800, 1344), "c", "d"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one image per runtime each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--models", default="r18,r50", help="comma-separated subset of: " + ", ".join(MODELS))
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lad-bench-export-"))
    try:
        runners, sizes = {}, {}
        for name in names:
            config_file, shape, ort_mode, torch_mode = MODELS[name]
            config = load_config(REPO / "configs" / config_file)
            model = build_detector(config.model).eval()
            save_checkpoint(work / f"{name}.pth", model, config.to_dict())
            report = export_onnx(work / f"{name}.pth", work / f"{name}.onnx")
            sizes[name] = {"onnx_bytes": report.size_bytes, "checkpoint_bytes": (work / f"{name}.pth").stat().st_size}
            graph = OnnxDetector(report.path, ["CPUExecutionProvider"], threads=torch.get_num_threads())
            deployed = DeployedDetector(model).eval()
            image = torch.randn(shape)
            runners[ort_mode] = lambda g=graph, x=image: g(x)
            runners[torch_mode] = lambda d=deployed, x=image: _torch_forward(d, x)
        times = _interleaved(runners, names, args.rounds, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {machine()}; onnxruntime CPU with {torch.get_num_threads()} intra-op threads; batch 1; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up; random weights")
    print(f"{'model':<22}{'ort s/img':>10}{'torch s/img':>12}{'onnx MiB':>10}")
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    for name in names:
        _, shape, a, b = MODELS[name]
        label = f"{name} {shape[2]}x{shape[3]}"
        print(f"{label:<22}{medians[a]:>10.4f}{medians[b]:>12.4f}{sizes[name]['onnx_bytes'] / 2**20:>10.1f}")
    ratios = report_ratios(times, {f"ort_over_torch_{name}": MODELS[name][2] + MODELS[name][3] for name in names})
    headline_name = "r50" if "r50" in names else names[0]
    headline = ratios[f"ort_over_torch_{headline_name}"]["median"]
    write_result("export", {"machine": machine(), "threads": torch.get_num_threads(), "rounds": args.rounds,
                            "warmup": args.warmup, "inputs": {n: list(MODELS[n][1]) for n in names},
                            "s_per_image": {n: {"onnxruntime": medians[MODELS[n][2]], "torch": medians[MODELS[n][3]]}
                                            for n in names},
                            "times": times, "sizes": sizes, "round_ratio": ratios,
                            "headline": {"ort_over_torch": headline, "model": headline_name}})
    print(f"headline: ort_over_torch = {headline:.3f} ({headline_name})")


def _torch_forward(deployed: DeployedDetector, image: torch.Tensor):
    with torch.inference_mode():
        return deployed(image)


def _interleaved(runners: dict, names: list[str], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each mode per round; per model its two runtimes run back to back, so a round's ratio is taken
    at one machine speed. The first ``warmup`` rounds are not kept."""
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    for n in range(warmup + rounds):
        for name in names:
            for mode in MODELS[name][2:]:
                seconds = timeit(runners[mode], repeats=1, warmup=0)
                if n >= warmup:
                    times[mode].append(seconds)
    return times


if __name__ == "__main__":
    main()
