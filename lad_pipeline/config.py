"""Typed configuration: TOML files into dataclasses, with ``section.key=value`` overrides.

Defaults are mmdetection's PAA 1x values, so a config file only states what differs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import LadError
from .runtime.atomic import atomic_write

# lad_pipeline.models.head; IOP and COP output class probabilities, their "base" variants have no IoU branch
HEADS = ("paa", "paa_iop", "paa_cop", "paa_iop_base", "paa_cop_base")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x4d", "resnext101_64x4d")
SWINS = ("swin_t", "swin_s", "swin_b")
BACKBONES = RESNETS + SWINS


@dataclass
class SwinConfig:
    """A Swin backbone's shape: ``embed_dim`` channels in stage 1 (stage i has ``embed_dim * 2**i``), blocks and
    attention heads per stage, window side (patch size 4). In ``[model.swin]`` each key overrides the preset
    named by ``model.backbone`` (0 or an empty list keeps the preset's), so toy runs can use small Swins."""

    embed_dim: int = 0
    depths: list[int] = field(default_factory=list)
    num_heads: list[int] = field(default_factory=list)
    window_size: int = 0


# the Swin paper's variants, as mmdetection's Swin detector configs build them
SWIN_PRESETS = {
    "swin_t": SwinConfig(96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
    "swin_s": SwinConfig(96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
    "swin_b": SwinConfig(128, [2, 2, 18, 2], [4, 8, 16, 32], 7),
}


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    num_classes: int = 80
    fpn_channels: int = 256
    head_channels: int = 256
    stacked_convs: int = 4
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    octave_base_scale: float = 8.0  # anchor side = octave_base_scale * stride (one square anchor per location)
    prior_prob: float = 0.01
    frozen_stages: int = 1  # stem (Swin: patch embedding) and stages 1..N get no gradients; -1 trains everything
    norm_eval: bool = True  # BN statistics frozen (mmdetection); false lets BN learn them, for from-scratch runs
    init_from: str = ""  # checkpoint (ours, mmdetection's, or an ImageNet backbone: torchvision's or Swin's)
    swin: SwinConfig = field(default_factory=SwinConfig)  # overrides of the swin_* preset
    drop_path_rate: float = 0.0  # Swin stochastic depth, rising linearly to this over the blocks
    # "paa" (class logits); the LAD authors' "paa_iop", "paa_cop" (class probabilities) and their "_base"
    # variants without the IoU branch
    head: str = "paa"
    cop_kernel: int = 3  # the COP head's neighbourhood: k x k class scores fused per location


@dataclass
class TeacherConfig:
    checkpoint: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    # the online teacher's arithmetic on CUDA (lad_pipeline.teacher.TEACHER_PRECISIONS): "fp32" is exact (TF32
    # off), "tf32" and "fp16" are faster and not bit-exact, "student" follows train.amp (fp16 with it, else fp32)
    precision: str = "fp32"
    # the online teacher and cache-labels (in groups of train.batch_size): views of one padded size share a forward
    # (each still padded to its own size). Faster on a GPU; a view's outputs then depend, to float rounding, on
    # what it is batched with (not bit-exact)
    batch_views: bool = False


@dataclass
class CoLADConfig:
    """Co-learning LAD: ``[model]`` is network 1, ``[colad.model]`` network 2; both are trained."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference_network: int = 2  # which network ``lad eval`` / ``lad show`` use by default (the recipe's use_teacher)


@dataclass
class AssignConfig:
    topk: int = 9
    pos_iou_thr: float = 0.1
    neg_iou_thr: float = 0.1
    ignore_iof_thr: float = -1.0  # > 0 makes anchors inside crowd boxes IGNORED; mmdetection's PAA disables it
    gmm: str = "torch"  # "torch" (batched) or "sklearn" (mmdetection's per-GT loop)


@dataclass
class LossConfig:
    """The training losses' settings; PAA scores candidates with the same focal and GIoU terms."""

    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    bbox_weight: float = 1.3
    iou_weight: float = 0.5


@dataclass
class DistillConfig:
    """What the student learns from its teacher (``lad train-student``; docs/solad.md).

    ``method``: ``lad`` the teacher's label assignment (LAD losses), ``solad`` LAD plus the soft-label KD
    losses, ``kd`` the KD losses alone. The KD knobs (term weights, focal ``gamma``, ``min_iou`` of the box-KD
    anchors) default to the SoLAD recipe; the KD recipe sets ``cls_weight = 10`` and ``min_iou = 0.1``.
    ``cls_on_padding``: the class term also covers batch-padding anchors, as the authors' code does; it needs
    the online teacher on the batch tensor (``train.teacher_batch_padding``).
    """

    method: str = "lad"
    cls_weight: float = 2.0
    iou_weight: float = 10.0
    bbox_weight: float = 1.3
    gamma: float = 0.5
    min_iou: float = 0.5
    cls_on_padding: bool = False


@dataclass
class TestConfig:
    __test__ = False  # not a test class, though pytest's naming rule says so

    nms_pre: int = 1000
    score_thr: float = 0.05
    nms_iou: float = 0.6
    max_per_img: int = 100
    score_voting: bool = True


@dataclass
class DataConfig:
    ann: str = ""
    images: str = ""
    val_ann: str = ""
    val_images: str = ""
    scales: list[list[int]] = field(default_factory=lambda: [[1333, 800]])  # (long, short); one entry = fixed
    # "list": each view takes one of the scales; "range": two scales bound a range, each view draws its long and
    # short side uniformly (integers) in between (mmdetection's multiscale_mode='range'); eval uses the first
    scale_mode: str = "list"
    flip_prob: float = 0.5
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisor: int = 32
    skip_bad_images: bool = False
    num_workers: int = 2


@dataclass
class TrainConfig:
    epochs: int = 12
    max_iters: int = 0  # > 0: stop after this many iterations (overrides epochs)
    batch_size: int = 8  # per process
    lr: float = 0.01  # for base_batch_size images per step; scaled linearly with the total batch
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs
    seed: int = 0
    amp: bool = False
    grad_clip: float = 0.0  # max grad norm; 0 disables
    optimizer: str = "sgd"  # "adamw": mmdetection's Swin recipe (no weight decay on norms and position bias tables)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    checkpoint_every: int = 500
    log_every: int = 50
    eval_every: int = 0  # > 0: COCO AP on data.val_ann every this many iterations and at the end (metrics.jsonl)
    tensorboard: str = ""  # a directory: the scalars of metrics.jsonl also as TensorBoard event files
    teacher_batch_padding: bool = False  # True: the online teacher sees the batch-padded tensor (mmdetection)
    device: str = ""  # cpu, cuda (under torchrun: the GPU of LOCAL_RANK) or cuda:N; "": cuda when there is one


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    colad: CoLADConfig = field(default_factory=CoLADConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    test: TestConfig = field(default_factory=TestConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- allowed values ------------------------------------------------------------------------------------------
# Every key's range, one line per key, checked (after its type) wherever a config is built: config files,
# `--set` overrides, a run's saved config.toml and the config embedded in a checkpoint. A bad value therefore
# stops a command before it builds a model or creates a run directory.


@dataclass(frozen=True)
class Allowed:
    test: Callable[[Any], bool]
    text: str  # completes "it must be ..."


def at_least(low: float) -> Allowed:
    return Allowed(lambda v: v >= low, f">= {low}")


def above(low: float) -> Allowed:
    return Allowed(lambda v: v > low, f"> {low}")


def between(low: float, high: float) -> Allowed:
    return Allowed(lambda v: low <= v <= high, f"between {low} and {high}")


def one_of(*choices: Any) -> Allowed:
    return Allowed(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


ANY = Allowed(lambda v: True, "anything")
PATH = Allowed(lambda v: True, "a path (checked when it is used)")
SCALES = Allowed(lambda v: len(v) > 0 and all(len(s) == 2 and min(s) > 0 for s in v),
                 "a non-empty list of [long, short] pairs of positive integers")
RGB = Allowed(lambda v: len(v) == 3, "three numbers (R, G, B)")
POSITIVE_RGB = Allowed(lambda v: len(v) == 3 and min(v) > 0, "three positive numbers (R, G, B)")
# the FPN's levels are C3-C5 (strides 8, 16, 32) and then stride-2 convolutions, one per extra level
STRIDES = Allowed(lambda v: len(v) >= 3 and v == [8 * 2**i for i in range(len(v))],
                  "8, 16, 32 and then doubling, e.g. [8, 16, 32, 64, 128]")
DEVICE = Allowed(lambda v: re.fullmatch(r"(cpu|cuda(:\d+)?|mps)?", v) is not None,
                 'cpu, cuda, cuda:N or mps ("": cuda when PyTorch sees a GPU, else cpu)')
EPOCH_STEPS = Allowed(lambda v: all(e >= 1 for e in v) and v == sorted(v), "epochs >= 1 in ascending order")
GROUPS_OF_32 = Allowed(lambda v: v >= 32 and v % 32 == 0,
                       "a positive multiple of 32 (the head's GroupNorm has 32 groups)")

ALLOWED: dict[type, dict[str, Allowed]] = {
    ModelConfig: {
        "backbone": one_of(*BACKBONES),
        "num_classes": at_least(1),
        "fpn_channels": at_least(1),
        "head_channels": GROUPS_OF_32,
        "stacked_convs": at_least(1),
        "strides": STRIDES,
        "octave_base_scale": above(0),
        "prior_prob": Allowed(lambda v: 0 < v < 1, "between 0 and 1, exclusive"),
        "frozen_stages": between(-1, 4),
        "norm_eval": ANY,
        "init_from": PATH,
        "swin": ANY,  # a table: its keys are SwinConfig's
        "drop_path_rate": Allowed(lambda v: 0 <= v < 1, ">= 0 and < 1"),
        "head": one_of(*HEADS),
        "cop_kernel": Allowed(lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1 (the neighbourhood is centred)"),
    },
    SwinConfig: {
        "embed_dim": at_least(0),
        "depths": Allowed(lambda v: v == [] or (len(v) == 4 and min(v) >= 1),
                          "4 block counts >= 1, one per stage (or [] for the preset's)"),
        "num_heads": Allowed(lambda v: v == [] or (len(v) == 4 and min(v) >= 1),
                             "4 head counts >= 1, one per stage (or [] for the preset's)"),
        "window_size": Allowed(lambda v: v == 0 or v >= 2,
                               ">= 2 (the shifted blocks move the windows by half a window), or 0 for the preset's"),
    },
    TeacherConfig: {
        "checkpoint": PATH,
        "model": ANY,  # a table: its keys are ModelConfig's
        "precision": one_of("fp32", "tf32", "fp16", "student"),
        "batch_views": ANY,
    },
    AssignConfig: {
        "topk": at_least(1),
        "pos_iou_thr": between(0, 1),
        "neg_iou_thr": between(0, 1),
        "ignore_iof_thr": Allowed(lambda v: v <= 1, "<= 1 (0 or less disables it)"),
        "gmm": one_of("torch", "sklearn"),
    },
    LossConfig: {
        "focal_gamma": at_least(0),
        "focal_alpha": between(0, 1),
        "bbox_weight": at_least(0),
        "iou_weight": at_least(0),
    },
    CoLADConfig: {
        "model": ANY,  # a table: its keys are ModelConfig's
        "inference_network": one_of(1, 2),
    },
    DistillConfig: {
        "method": one_of("lad", "solad", "kd"),
        "cls_weight": at_least(0),
        "iou_weight": at_least(0),
        "bbox_weight": at_least(0),
        "gamma": at_least(0),
        "min_iou": Allowed(lambda v: 0 <= v < 1, ">= 0 and < 1"),
        "cls_on_padding": ANY,
    },
    TestConfig: {
        "nms_pre": at_least(-1),  # -1 or 0: every anchor
        "score_thr": between(0, 1),
        "nms_iou": between(0, 1),
        "max_per_img": at_least(1),
        "score_voting": ANY,
    },
    DataConfig: {
        "ann": PATH,
        "images": PATH,
        "val_ann": PATH,
        "val_images": PATH,
        "scales": SCALES,
        "scale_mode": one_of("list", "range"),
        "flip_prob": between(0, 1),
        "mean": RGB,
        "std": POSITIVE_RGB,
        "size_divisor": at_least(1),
        "skip_bad_images": ANY,
        "num_workers": at_least(0),
    },
    TrainConfig: {
        "epochs": at_least(1),  # also with max_iters: the lr steps are fractions of the epochs
        "max_iters": at_least(0),  # 0: train.epochs decides
        "batch_size": at_least(1),
        "lr": above(0),
        "base_batch_size": at_least(1),
        "momentum": Allowed(lambda v: 0 <= v < 1, ">= 0 and < 1"),
        "weight_decay": at_least(0),
        "warmup_iters": at_least(0),
        "warmup_ratio": between(0, 1),
        "lr_steps": EPOCH_STEPS,
        "seed": Allowed(lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1"),
        "amp": ANY,
        "grad_clip": at_least(0),  # 0: no clipping
        "optimizer": one_of("sgd", "adamw"),
        "betas": Allowed(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers >= 0 and < 1"),
        "checkpoint_every": at_least(1),
        "log_every": at_least(1),
        "eval_every": at_least(0),  # 0: no validation during training
        "tensorboard": PATH,
        "teacher_batch_padding": ANY,
        "device": DEVICE,
    },
}


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """Validate ``value`` against a field's type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise LadError(f"config key {name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise LadError(f"config key {name}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise LadError(f"config key {name}: expected a number, got {value!r}")
    if not isinstance(value, hint):
        raise LadError(f"config key {name}: expected {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise LadError(f"config key {name} is {value!r}; it must be a finite number")
    return value


# keys that were renamed: (section dataclass, old name) -> new name
RENAMED: dict[tuple[type, str], str] = {(ModelConfig, "anchor_scale"): "octave_base_scale"}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    rules = ALLOWED.get(cls, {})
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if (cls, key) in RENAMED:
            raise LadError(f"config key {name} was renamed {prefix}{RENAMED[cls, key]}",
                           hint="rename it in the config file or the --set option")
        if key not in known:
            raise LadError(f"unknown config key {name} (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise LadError(f"config key {name} must be a table")
            kwargs[key] = _build(hint, value, name + ".")
        else:
            kwargs[key] = _check_value(name, value, hint)
            if key in rules and not rules[key].test(kwargs[key]):
                raise LadError(f"config key {name} is {_show(kwargs[key])}; it must be {rules[key].text}")
    built = cls(**kwargs)
    if cls is ModelConfig:
        resolved_swin(built, prefix)  # keys that must agree with each other
    return built


def resolved_swin(model: ModelConfig, prefix: str = "model.") -> SwinConfig:
    """The Swin shape ``model`` asks for: its preset with ``[model.swin]``'s overrides, checked.

    For a ResNet backbone the Swin keys must be left unset.
    """
    if model.backbone not in SWINS:
        if model.swin != SwinConfig() or model.drop_path_rate:
            raise LadError(f"config keys {prefix}swin and {prefix}drop_path_rate apply to Swin backbones; "
                           f"{prefix}backbone is {model.backbone!r}: remove them or choose one of {', '.join(SWINS)}")
        return model.swin
    preset, given = SWIN_PRESETS[model.backbone], model.swin
    swin = SwinConfig(given.embed_dim or preset.embed_dim, list(given.depths or preset.depths),
                      list(given.num_heads or preset.num_heads), given.window_size or preset.window_size)
    for stage, heads in enumerate(swin.num_heads):
        width = swin.embed_dim * 2**stage
        if width % heads:
            raise LadError(f"{prefix}backbone {model.backbone}: stage {stage + 1} has {width} channels "
                           f"({prefix}swin.embed_dim {swin.embed_dim} x {2 ** stage}), which {heads} heads do not "
                           f"divide; change {prefix}swin.embed_dim or {prefix}swin.num_heads")
    return swin


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else _toml_value(value)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise LadError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set model.backbone=resnet18
    return key.split("."), value


def config_from_dict(data: dict[str, Any], overrides: Iterable[str] = ()) -> Config:
    """Build a Config from nested dicts (as TOML gives them), then apply ``key=value`` overrides."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LadError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return _build(Config, data, "")


MOVED_TO_LOSS = ("focal_gamma", "focal_alpha", "bbox_weight")  # once also keys of [assign]


def rename_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict embedded in a checkpoint written before a key was renamed, under the new names."""
    data = _deep_copy(data)
    assign = data.get("assign")
    if isinstance(assign, dict):  # the PAA score's weights now come from [loss], their one home
        for key in MOVED_TO_LOSS:
            assign.pop(key, None)
    teacher = data.get("teacher")
    for section in (data.get("model"), teacher.get("model") if isinstance(teacher, dict) else None):
        if isinstance(section, dict):
            for (cls, old), new in RENAMED.items():
                if cls is ModelConfig and old in section and new not in section:
                    section[new] = section.pop(old)
    return data


def resolve_paths(config: Config, base: str | Path | None = None) -> Config:
    """The config with every path key (``data.ann``, ``data.val_images``, ``model.init_from``,
    ``teacher.checkpoint``, ``train.tensorboard``, ...) made absolute against ``base`` (default: the current
    directory). A run saves its config resolved, so that the run means the same files from any directory."""
    base = Path(base) if base is not None else Path.cwd()

    def resolve(node: Any) -> Any:
        rules = ALLOWED.get(type(node), {})
        changes = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = resolve(value)
            elif rules.get(f.name) is PATH and value and "://" not in value:  # a URL stays as it is
                changes[f.name] = os.path.abspath(base / Path(value).expanduser())
        return dataclasses.replace(node, **changes)

    return resolve(config)


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Load a TOML config file; ``overrides`` are ``"section.key=value"`` strings (TOML values)."""
    path = Path(path)
    if not path.is_file():
        raise LadError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LadError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(data, overrides)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (enough for Config; tomllib has no writer)."""
    lines: list[str] = []

    def table(node: dict[str, Any], name: str) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if name:
            lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in node.items():
            if isinstance(v, dict):
                table(v, f"{name}.{k}" if name else k)

    table(data, "")
    return "\n".join(lines).lstrip("\n")


# sections of features a run may not use (a teacher, CoLAD's second network, soft-label KD): written only when
# they differ from their defaults, so that a plain run's config shows only what it uses
OPTIONAL_SECTIONS = ("teacher", "colad", "distill")


def save_config(config: Config, path: str | Path) -> None:
    """Write the config as TOML, atomically (aside, then renamed): a crash never leaves half a config.

    An optional section at its defaults is left out; loading the file gives the same config."""
    data, defaults = config.to_dict(), Config().to_dict()
    for name in OPTIONAL_SECTIONS:
        if data[name] == defaults[name]:
            del data[name]
    with atomic_write(path, "w", what="config") as f:
        f.write(dump_toml(data))
