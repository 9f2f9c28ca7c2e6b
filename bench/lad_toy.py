"""The quickstart's experiment over several seeds: PAA, LAD, KD, SoLAD and CoLAD students on the toy digits.

    python bench/lad_toy.py [--work DIR] [--seeds 0 1 2] [--jobs 2] [--rows paa lad kd solad colad]

Runs what ``examples/quickstart.sh`` runs, with the same configs, dataset and schedules (override them with
``--teacher-config``, ``--student-config``, ``--teacher-iters``, ``--student-iters``, ``--train-images``,
``--val-images``): the toy digits, one teacher trained with plain PAA (seed 0), its labels cached for both flips
(with the soft records, ``lad cache-labels --soft``; a second store keeps the KD recipe's wider box-KD
anchors), then for every seed one student per row, all for the same
iterations:

- ``paa``: the student alone, plain PAA on its own labels;
- ``lad``: the teacher's cached hard labels (LAD);
- ``kd``: the teacher's cached soft labels alone (the KD recipe: class weight 10, box KD above IoU 0.1);
- ``solad``: LAD plus the soft-label KD losses (the SoLAD recipe);
- ``colad``: no teacher; the student co-learns with a ResNet-50 from scratch (``toy_colad_r18_r50.toml``), both
  networks evaluated, against the ResNet-50 trained alone with plain PAA for the same iterations;
- ``iop``, ``cop`` (not run by default): the student with the LAD authors' IOP or COP head, plain PAA on its own
  labels; ``lad_cop``: the COP student of the teacher's cached labels (``docs/heads.md``). For example
  ``--rows paa iop cop lad lad_cop --json bench/heads_toy.json --no-docs``.

AP is COCO AP@[.5:.95] on the toy val split from ``lad eval``. Everything goes through the real ``lad`` command
line; ``--jobs 2`` trains two runs at a time, one CPU thread each (the numbers do not depend on it). Writes
bench/lad_toy.json, docs/results.md and docs/lad_toy_curves.png; the last line is the mean AP gain of LAD over PAA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TEACHER_CONFIG = CONFIGS / "toy_teacher_r18.toml"  # the quickstart's pair
STUDENT_CONFIG = CONFIGS / "toy_student_r18.toml"
COLAD_CONFIG = CONFIGS / "toy_colad_r18_r50.toml"
PEER_CONFIG = CONFIGS / "toy_teacher_r50.toml"  # CoLAD's second network, trained alone
TRAIN_IMAGES, VAL_IMAGES = 512, 128  # lad make-toy-data's defaults, as the quickstart makes them
KD_RECIPE = ('distill.method="kd"', "distill.cls_weight=10.0", "distill.min_iou=0.1")
SOLAD_RECIPE = ('distill.method="solad"',)
ROWS = ("paa", "lad", "kd", "solad", "colad", "iop", "cop", "lad_cop")
DEFAULT_ROWS = ROWS[:5]
TITLES = {"iop": "PAA with the IOP head (own labels)", "cop": "PAA with the COP head (own labels)",
          "lad_cop": "LAD with the COP head (teacher's labels, cached)",
          "paa": "PAA (own labels)", "lad": "LAD (teacher's labels, cached)", "kd": "KD (teacher's soft labels)",
          "solad": "SoLAD (LAD + soft labels)", "colad": "CoLAD (with a {peer}, no teacher)"}


def lad(*args: object, threads: Optional[int] = None) -> None:
    cmd = [sys.executable, "-m", "cli", *map(str, args)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")


def load(config: Path):
    from lad_pipeline.config import load_config

    return load_config(config)


def model_name(config: Path) -> str:
    return load(config).model.backbone.replace("resnet", "ResNet-")


def evaluate(run: Path, toy: Path, network: Optional[int] = None) -> dict:
    metrics = run / (f"val_metrics_network{network}.json" if network else "val_metrics.json")
    if not metrics.exists():
        pick = ["--network", network] if network else []
        lad("eval", "--checkpoint", run / "checkpoints" / "final.pth", "--ann", toy / "val" / "annotations.json",
            "--images", toy / "val" / "images", "--out", metrics, *pick)
    return json.loads(metrics.read_text())


def train(command: list, config: Path, out: Path, toy: Path, iters: Optional[int], seed: int,
          sets: tuple = (), threads: Optional[int] = None) -> Path:
    """A finished run directory (resumed if a previous run of this script stopped half way)."""
    if not (out / "checkpoints" / "final.pth").exists():
        data = ["--ann", toy / "train" / "annotations.json", "--images", toy / "train" / "images"]
        overrides = [f"train.seed={seed}", *([f"train.max_iters={iters}"] if iters else []),
                     f"data.val_ann={json.dumps(str(toy / 'val' / 'annotations.json'))}",
                     f"data.val_images={json.dumps(str(toy / 'val' / 'images'))}", *sets]
        resume = ["--resume"] if out.exists() else []
        lad(*command, "--config", config, *data, "--out", out, *[a for s in overrides for a in ("--set", s)],
            *resume, threads=threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "lad_toy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at a time (one CPU thread each if > 1)")
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "lad_toy.json", help="where the results go")
    ap.add_argument("--teacher-config", type=Path, default=TEACHER_CONFIG)
    ap.add_argument("--student-config", type=Path, default=STUDENT_CONFIG)
    ap.add_argument("--teacher-iters", type=int, help="default: the teacher config's train.max_iters")
    ap.add_argument("--student-iters", type=int, help="default: the student config's train.max_iters")
    ap.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    ap.add_argument("--val-images", type=int, default=VAL_IMAGES)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the teacher and every student (repeatable)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md and the curves")
    args = ap.parse_args()
    extra = tuple(args.overrides)
    rows = [r for r in ROWS if r in set(args.rows) | {"paa"}]  # PAA is every row's baseline
    work, toy = args.work, args.work / "toy"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not (toy / "toy.json").exists():
        lad("make-toy-data", toy, "--train", args.train_images, "--val", args.val_images, "--seed", 0)
    teacher_reused = (work / "teacher" / "checkpoints" / "final.pth").exists()
    teacher = train(["train-teacher"], args.teacher_config, work / "teacher", toy, args.teacher_iters, 0, extra)
    # the SoLAD recipe's cache (box-KD anchors above IoU 0.5), and the KD recipe's (above 0.1)
    cache, kd_cache = work / "labels.zarr", work / "labels_kd.zarr"
    for store, min_iou, wanted in ((cache, 0.5, True), (kd_cache, 0.1, "kd" in rows)):
        if wanted and not ((store / "zarr.json").exists() and "finalized" in (store / "zarr.json").read_text()):
            lad("cache-labels", "--teacher", teacher / "checkpoints" / "final.pth", "--ann",
                toy / "train" / "annotations.json", "--images", toy / "train" / "images", "--out", store, "--soft",
                "--soft-min-iou", min_iou, "--resume")
    iters = args.student_iters or load(args.student_config).train.max_iters
    threads = 1 if args.jobs > 1 else None
    student = {  # run name -> (command, config, extra overrides)
        "paa": (["train-teacher"], args.student_config, ()),
        "lad": (["train-student", "--cache", cache], args.student_config, ()),
        "kd": (["train-student", "--cache", kd_cache], args.student_config, KD_RECIPE),
        "solad": (["train-student", "--cache", cache], args.student_config, SOLAD_RECIPE),
        "colad": (["train-colad"], COLAD_CONFIG, ()),
        "peer_paa": (["train-teacher"], PEER_CONFIG, ()),  # CoLAD's second network alone
        "iop": (["train-teacher"], args.student_config, ("model.head=paa_iop",)),
        "cop": (["train-teacher"], args.student_config, ("model.head=paa_cop",)),
        "lad_cop": (["train-student", "--cache", cache], args.student_config, ("model.head=paa_cop",)),
    }
    names = rows + (["peer_paa"] if "colad" in rows else [])
    # the slow runs first, so that two workers finish together
    jobs = sorted(((seed, name) for seed in args.seeds for name in names),
                  key=lambda j: (j[1] not in ("colad", "peer_paa"), j[0]))

    def run(job: tuple[int, str]) -> tuple[int, str, dict]:
        seed, name = job
        command, config, sets = student[name]
        if (work / f"{name}_s{seed}" / "checkpoints" / "final.pth").exists():
            reused.append(f"{name}_s{seed}")
        out = train(command, config, work / f"{name}_s{seed}", toy, iters, seed, (*sets, *extra), threads)
        if name == "colad":
            ap_ = {f"network{n}": evaluate(out, toy, n)["AP"] for n in (1, 2)}
        else:
            ap_ = {"AP": evaluate(out, toy)["AP"]}
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in ap_.items()), flush=True)
        return seed, name, ap_

    reused: list[str] = []  # runs a previous invocation finished (not timed by this one)
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        done = {(seed, name): ap_ for seed, name, ap_ in pool.map(run, jobs)}
    per_row = {name: [done[s, name]["AP"] for s in args.seeds] for name in names if name != "colad"}
    if "colad" in rows:
        per_row["colad"] = [done[s, "colad"]["network1"] for s in args.seeds]
        per_row["colad_peer"] = [done[s, "colad"]["network2"] for s in args.seeds]
    results = {
        "teacher_config": _rel(args.teacher_config), "student_config": _rel(args.student_config),
        "teacher_iters": args.teacher_iters or load(args.teacher_config).train.max_iters, "student_iters": iters,
        "train_images": args.train_images, "val_images": args.val_images, "seeds": args.seeds,
        "teacher": model_name(args.teacher_config), "student": model_name(args.student_config),
        "peer": model_name(PEER_CONFIG), "teacher_ap": evaluate(teacher, toy)["AP"], "ap": per_row,
        "gain": {name: [b - a for a, b in zip(per_row["paa"], per_row[name])] for name in rows if name != "paa"},
        "minutes": round((time.time() - start) / 60, 1), "jobs": args.jobs, "machine": _machine(),
        "overrides": list(extra), "reused": ["teacher"] * teacher_reused + sorted(reused),
    }
    if "colad" in rows:
        results["gain"]["colad_peer"] = [b - a for a, b in zip(per_row["peer_paa"], per_row["colad_peer"])]
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_docs:
        from lad_pipeline.plot import plot_runs

        shown = [name for name in ("paa", "lad", "solad") if name in rows]
        plot_runs([work / f"{name}_s{seed}" for seed in args.seeds for name in shown],
                  REPO / "docs" / "lad_toy_curves.png",
                  [f"{name.upper()} seed {seed}" for seed in args.seeds for name in shown])
        write_markdown(results, rows)
    if "lad" in rows:
        gain = statistics.mean(results["gain"]["lad"])
        sd = max(_sd(per_row["paa"]), _sd(per_row["lad"]))
        print(f"margin {100 * gain:+.2f} AP, twice the larger seed sd {200 * sd:.2f}")
        print(f"headline: lad_gain_ap = {gain:+.4f}")


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _machine() -> str:
    from common import cpu_model

    return f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU threads"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_sd(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * _sd(values):.1f}"


def _verdict(gains: list[float], base: list[float], other: list[float]) -> str:
    gain, sd = statistics.mean(gains), max(_sd(base), _sd(other))
    word = "larger than" if gain > 2 * sd else "within"
    return f"{100 * gain:+.1f} ({word} twice the seed sd, {200 * sd:.1f})"


def write_markdown(r: dict, rows: list[str]) -> None:
    ap_, gain = r["ap"], r["gain"]
    seeds = " ".join(map(str, r["seeds"]))
    names = {"lad": "LAD", "kd": "KD", "solad": "SoLAD", "colad": "CoLAD", "iop": "IOP", "cop": "COP",
             "lad_cop": "LAD with COP"}
    shown = [names[n] for n in rows if n in names]
    lines = [
        f"# Results: {', '.join(shown[:-1]) + ' and ' + shown[-1] if len(shown) > 1 else ''.join(shown)} "
        "on the toy digits",
        "",
        f"Made by `python bench/lad_toy.py --seeds {seeds} --jobs {r['jobs']}"
        f"{''.join(' --set ' + o for o in r['overrides'])}`: the quickstart's own settings "
        f"(`{r['teacher_config']}` for {r['teacher_iters']} iterations, `{r['student_config']}` for "
        f"{r['student_iters']}, {r['train_images']} training images), {r['minutes']} minutes on {r['machine']}"
        + (f" ({', '.join(r['reused'])} were finished by an earlier invocation with the same settings and are "
           "not in that time)" if r["reused"] else "") + ". "
        f"COCO AP@[.5:.95] x 100 on the toy val split ({r['val_images']} images), mean ± standard deviation over "
        "the students' seeds (weights, data order, augmentation); one teacher (seed 0, "
        f"{r['teacher']}, {100 * r['teacher_ap']:.1f} AP) and its label cache (hard and soft labels; the KD row "
        "reads a second one that keeps the KD recipe's wider box-KD anchors) for all of them. Every student of a seed trains for the same iterations from the same start; the rows differ only "
        "in where the labels come from.",
        "",
        f"| {r['student']} student | AP | gain over PAA per seed | mean gain |",
        "| --- | --- | --- | --- |",
        f"| {TITLES['paa']} | {_mean_sd(ap_['paa'])} | | |",
    ]
    for name in rows:
        if name == "paa":
            continue
        lines.append(f"| {TITLES[name].format(peer=r['peer'])} | {_mean_sd(ap_[name])} | "
                     f"{', '.join(f'{100 * g:+.1f}' for g in gain[name])} | "
                     f"{_verdict(gain[name], ap_['paa'], ap_[name])} |")
    if "lad" in rows and "solad" in rows:
        over = [b - a for a, b in zip(ap_["lad"], ap_["solad"])]
        lines += ["", f"SoLAD over LAD per seed: {', '.join(f'{100 * g:+.1f}' for g in over)} AP: on these digits the "
                  "soft labels add to the teacher's assignment" + (" on every seed." if min(over) > 0 else
                                                                  ", though not on every seed.")]
    if "lad" in rows and "kd" in rows and statistics.mean(ap_["kd"]) > statistics.mean(ap_["lad"]):
        lines += ["", "Unlike the paper on COCO, where LAD beats the soft labels alone, KD beats LAD here, presumably because a small "
                  "student trained from scratch for few iterations gains more from the teacher's per-anchor class "
                  "probabilities than from its choice of positives alone."]
    if "colad" in rows:
        lines += [
            "",
            f"CoLAD's other network, the {r['peer']}, against the same network trained alone:",
            "",
            f"| {r['peer']} | AP | gain per seed | mean gain |",
            "| --- | --- | --- | --- |",
            f"| PAA alone | {_mean_sd(ap_['peer_paa'])} | | |",
            f"| CoLAD (with the {r['student']}) | {_mean_sd(ap_['colad_peer'])} | "
            f"{', '.join(f'{100 * g:+.1f}' for g in gain['colad_peer'])} | "
            f"{_verdict(gain['colad_peer'], ap_['peer_paa'], ap_['colad_peer'])} |",
        ]
    lines += [
        "",
        "Why LAD's gain is this large here: the toy configs use anchors half COCO's size "
        "(`model.octave_base_scale = 4`, 32 px on P3), so every digit (25-85 px in a 128 px view) has candidate "
        "anchors on two or three FPN levels. A student that picks its own positives early in training spreads them "
        "over levels and anchors that do not suit the digit; the teacher's assignment shows it where each digit "
        "belongs from the first iteration. With COCO's size (`--set model.octave_base_scale=8.0`, one seed, measured "
        "with the same configs and commands) the teacher reached 27.4 AP and the two students tied at 500 iterations "
        "(PAA 10.6, LAD 10.5): on these digits, with COCO's anchors, a student's own assignment is already as good "
        "as the teacher's.",
        "",
        "![loss terms (and validation AP, when the runs validated) of the PAA, LAD and SoLAD students]"
        "(lad_toy_curves.png)",
        "",
        "The paper's claims (COCO, 1x): LAD lifts PAA R-50 from 40.4 to 41.6 AP with an R-101 teacher, and "
        "PAA R-101 from 42.6 to 43.3 with a smaller R-50 teacher; soft labels and LAD are complementary (SoLAD); "
        "CoLAD lifts both networks of a pair trained from scratch together.",
        "",
    ]
    (REPO / "docs" / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
