"""``lad export``: the ONNX graph against PyTorch (golden inputs, toy images), ``lad eval/show --onnx`` against
``--checkpoint``, and what the commands say about bad input."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, golden_batch
from golden_data import GOLDEN
from mmdet_recipe import INFER_CLS_BIAS, PRIOR_BIAS, SEED_R50, SEED_SMALL, load_manifest, recipe_state_dict
from toy_world import assert_one_line_error, lad, save_teacher, tiny_config

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")

from lad_pipeline.checkpoint import load_detector, save_checkpoint  # noqa: E402
from lad_pipeline.config import load_config  # noqa: E402
from lad_pipeline.data import read_image  # noqa: E402
from lad_pipeline.errors import LadError  # noqa: E402
from lad_pipeline.evaluate.predictor import Predictor  # noqa: E402
from lad_pipeline.export import DeployedDetector, OnnxDetector, export_onnx  # noqa: E402
from lad_pipeline.models import build_detector  # noqa: E402
from lad_pipeline.postprocess import postprocess, postprocess_decoded  # noqa: E402

BOX_ATOL, BOX_RTOL = 1e-3, 1e-4  # pixels, of the coordinate
SCORE_RTOL = 1e-4
INFER_SHAPES = [(288, 384), (256, 320)]  # the mmdetection inference golden's images (seed 4004)
INFER_SEED = 4004
# (config, mmdetection model name in the key manifest, weight seed, class-logit bias): the R-50 with the inference
# golden's bias, so that its detections can be compared with mmdetection's
GOLDEN_MODELS = {
    "r50": ("paa_r50_fpn_1x_coco.toml", "paa_r50_fpn_1x_coco", SEED_R50, PRIOR_BIAS + INFER_CLS_BIAS),
    "small": ("paa_r18_small.toml", "paa_small_r18_fpn64", SEED_SMALL, PRIOR_BIAS),
}
# a short real training of the toy teacher: a detector with an AP well above 0 on its own val split
TRAIN = ("train.max_iters=60", "train.batch_size=4", "train.warmup_iters=5", "train.lr=0.04", "train.eval_every=0",
         "train.log_every=20", "train.checkpoint_every=1000")


def assert_parity(torch_out, ort_out) -> None:
    (boxes, scores), (ort_boxes, ort_scores) = torch_out, ort_out
    assert ort_boxes.shape == boxes.shape and ort_scores.shape == scores.shape
    torch.testing.assert_close(ort_boxes, boxes, rtol=BOX_RTOL, atol=BOX_ATOL)
    torch.testing.assert_close(ort_scores, scores, rtol=SCORE_RTOL, atol=1e-7)


def assert_same_detections(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.scores, b.scores, rtol=SCORE_RTOL, atol=1e-7)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=BOX_RTOL, atol=BOX_ATOL)


# -- graphs made once per module --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden_graphs(tmp_path_factory):
    """The golden mmdetection models, saved as mmdetection checkpoints and exported with their --config:
    {name: (the PyTorch graph module, the exported graph)}."""
    manifest = load_manifest(GOLDEN)
    root = tmp_path_factory.mktemp("golden_graphs")
    graphs = {}
    for name, (config_file, manifest_name, seed, bias) in GOLDEN_MODELS.items():
        ckpt = root / f"{name}.pth"
        torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": recipe_state_dict(manifest, manifest_name, seed,
                                                                                            bias)}, ckpt)
        config = REPO / "configs" / config_file
        report = export_onnx(ckpt, root / f"{name}.onnx", config_path=config)  # checks its own parity too
        assert report.max_score_error <= SCORE_RTOL
        model, _, _ = load_detector(ckpt, config)
        graphs[name] = (DeployedDetector(model).eval(), OnnxDetector(report.path, ["CPUExecutionProvider"]))
    return graphs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy teacher trained for 60 iterations by the real CLI on 24 toy images, its checkpoint exported by the
    CLI, and a 12-image val split: (checkpoint, graph path, val data args)."""
    root = tmp_path_factory.mktemp("trained")
    made = lad("make-toy-data", root / "toy", "--train", "24", "--val", "12", "--seed", "1")
    assert made.returncode == 0, made.stderr
    train = lad("train-teacher", "--config", REPO / "configs" / "toy_teacher_r18.toml",
                "--ann", root / "toy/train/annotations.json", "--images", root / "toy/train/images",
                "--out", root / "run", *[a for item in TRAIN for a in ("--set", item)], timeout=600)
    assert train.returncode == 0, train.stderr
    ckpt = root / "run" / "checkpoints" / "final.pth"
    exported = lad("export", "--checkpoint", ckpt, "--out", root / "model.onnx")
    assert exported.returncode == 0, exported.stderr
    assert re.search(r"boxes within \S+ px, scores within \S+ relative", exported.stdout), exported.stdout
    val = ["--ann", root / "toy/val/annotations.json", "--images", root / "toy/val/images"]
    return ckpt, root / "model.onnx", val


# -- parity: onnxruntime against PyTorch --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GOLDEN_MODELS))
def test_graph_matches_pytorch_on_golden_inputs(golden_graphs, name):
    deployed, graph = golden_graphs[name]
    for images in (golden_batch(), golden_batch(INFER_SEED, INFER_SHAPES), golden_batch(shapes=[(128, 192)])):
        with torch.no_grad():
            expected = deployed(images)
        assert_parity(expected, graph(images))
    assert graph.num_classes == 80 and graph.anchors == deployed.anchors


def test_r50_graph_detections_match_mmdetection(golden_graphs):
    """The whole ONNX path (graph, then lad's post-processing with score voting) on the mmdetection inference
    golden's images gives mmdetection's detections, as the PyTorch path does (test_postprocess)."""
    _, graph = golden_graphs["r50"]
    images = golden_batch(INFER_SEED, INFER_SHAPES)
    boxes, scores = graph(images)
    dets = postprocess_decoded(boxes, scores, tuple(images.shape[-2:]), INFER_SHAPES, anchors=graph.anchors,
                               config=graph.config.test)
    with np.load(GOLDEN / "infer_expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    for i, det in enumerate(dets):
        want = expected[f"img{i}_bboxes"]
        np.testing.assert_array_equal(det.labels.numpy(), expected[f"img{i}_labels"])
        np.testing.assert_allclose(det.scores.numpy(), expected[f"img{i}_scores"], rtol=0, atol=1e-4)
        finite = ~np.isnan(want).any(axis=1)  # mmdetection votes 0/0 for zero-area boxes (see test_postprocess)
        np.testing.assert_allclose(det.boxes.numpy()[finite], want[finite], rtol=0, atol=0.05)


def test_postprocess_decoded_is_postprocess(golden_graphs):
    """The per-anchor entry of the post-processing gives what the head-output entry gives on the same forward
    (to the last bits of the graph's explicit sigmoid)."""
    deployed, _ = golden_graphs["r50"]
    images = golden_batch(INFER_SEED, INFER_SHAPES)
    with torch.no_grad():
        outs = deployed.detector(images)
        boxes, scores = deployed(images)
    for factors in (None, [(0.8, 0.75), (1.25, 0.5)]):
        ours = postprocess_decoded(boxes, scores, tuple(images.shape[-2:]), INFER_SHAPES, factors,
                                   anchors=deployed.anchors)
        theirs = postprocess(outs, INFER_SHAPES, factors, anchors=deployed.anchors)
        for a, b in zip(ours, theirs):
            assert torch.equal(a.labels, b.labels) and len(a.labels) == 100
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-6, atol=1e-4)


def test_toy_graph_matches_pytorch_at_several_sizes(trained):
    ckpt, path, val = trained
    model, config, _ = load_detector(ckpt)
    deployed, graph = DeployedDetector(model).eval(), OnnxDetector(path)
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 3, 128, 128), (2, 3, 96, 128), (1, 3, 128, 96), (3, 3, 64, 160), (1, 3, 320, 224)):
        images = torch.randn(shape, generator=gen)
        with torch.no_grad():
            expected = deployed(images)
        assert_parity(expected, graph(images))
    # whole images of several sizes, through the Predictor: the same detections in original pixels
    files = sorted(Path(val[3]).iterdir())[:6]
    images = [read_image(f) for f in files]
    assert len({tuple(i.shape) for i in images}) > 1
    ours = Predictor.from_onnx(path).predict(images)
    theirs = Predictor.from_checkpoint(ckpt, device="cpu").predict(images)
    assert sum(len(d.labels) for d in theirs) > 0
    assert_same_detections(ours, theirs)


def test_graph_records_what_lad_needs(trained):
    ckpt, path, _ = trained
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    config = load_config(REPO / "configs" / "toy_teacher_r18.toml")
    assert meta["lad_format"] == "lad-paa-detector" and meta["num_classes"] == "10"
    assert json.loads(meta["anchor_layout"]) == {"strides": [8, 16, 32, 64, 128], "octave_base_scale": 4.0}
    assert json.loads(meta["normalization"]) == {"mean": config.data.mean, "std": config.data.std,
                                                 "size_divisor": 32, "scales": [[128, 128]]}
    assert json.loads(meta["test"])["score_voting"] is True
    assert json.loads(meta["source"])["checkpoint"] == ckpt.name
    graph = OnnxDetector(path)
    assert graph.config.model.backbone == "resnet18" and graph.config.data.scales == [[128, 128]]


# -- the commands ------------------------------------------------------------------------------------------
def test_eval_onnx_gives_the_checkpoints_ap(trained, tmp_path):
    ckpt, path, val = trained
    by_graph = lad("eval", "--onnx", path, *val, "--out", tmp_path / "onnx.json")
    by_ckpt = lad("eval", "--checkpoint", ckpt, *val, "--out", tmp_path / "ckpt.json")
    assert by_graph.returncode == 0, by_graph.stderr
    assert by_ckpt.returncode == 0, by_ckpt.stderr
    onnx_metrics, ckpt_metrics = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("onnx", "ckpt"))
    assert ckpt_metrics["AP"] > 0.01  # a detector that finds digits, so that equal APs mean something
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert round(onnx_metrics[key], 3) == round(ckpt_metrics[key], 3), key
    assert onnx_metrics["source"] == str(path)


def test_show_onnx_draws_the_checkpoints_detections(trained, tmp_path):
    ckpt, path, val = trained
    image_id = json.loads(Path(val[1]).read_text())["images"][0]["id"]
    shown = {}
    for flag, source in (("--onnx", path), ("--checkpoint", ckpt)):
        result = lad("show", flag, source, "--image-id", image_id, *val, "--score-thr", "0.1",
                     "--out", tmp_path / f"{flag[2:]}.png")
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"{flag[2:]}.png").stat().st_size > 0
        shown[flag] = result.stdout.split(": ", 1)[1]  # the detections drawn, after the file name
    assert shown["--onnx"] == shown["--checkpoint"]


def test_export_colad_checkpoint_needs_network(world, tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    net1, net2 = build_detector(config.model), build_detector(config.colad.model)
    ckpt = tmp_path / "colad.pth"
    save_checkpoint(ckpt, net1, config.to_dict(), peers={"colad": net2.state_dict()})
    assert_one_line_error(lad("export", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx"), "two detectors", "--network 1 or 2")
    assert not (tmp_path / "m.onnx").exists()
    assert export_onnx(ckpt, tmp_path / "m.onnx", network=2).network == 2
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["source"])["network"] == 2
    assert json.loads(meta["model"])["backbone"] == config.colad.model.backbone


def test_export_refuses_non_finite_weights(world, tmp_path):
    config = tiny_config()
    model = build_detector(config.model)
    with torch.no_grad():
        model.bbox_head.cls_logits.weight[0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "nan.pth"
    save_checkpoint(ckpt, model, config.to_dict())
    assert_one_line_error(lad("export", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx"), "non-finite", "cls_logits")
    assert not any(tmp_path.glob("*onnx*"))


def test_export_without_the_extra_names_it(world, tmp_path):
    # a package named onnx that cannot be imported stands for an environment without the extra
    shadow = tmp_path / "shadow" / "onnx"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = lad("export", "--checkpoint", world.teacher, "--out", tmp_path / "m.onnx",
                 env={"PYTHONPATH": f"{REPO}:{shadow.parent}"})
    assert_one_line_error(result, "onnx package", 'pip install "lad[export]"')


def test_bad_onnx_files_one_line_each(world, trained, tmp_path):
    _, path, val = trained
    # corrupt, truncated
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf" * 100)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (garbage, truncated):
        assert_one_line_error(lad("eval", "--onnx", bad, *val), str(bad), "cannot be loaded", "lad export")
    assert_one_line_error(lad("eval", "--onnx", tmp_path / "absent.onnx", *val), "not found")

    # another model: inputs and outputs not ours, no lad metadata
    helper = onnx.helper
    other = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "other",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])]),
        opset_imports=[helper.make_opsetid("", 17)])
    other.ir_version = 8
    onnx.save(other, str(tmp_path / "other.onnx"))
    assert_one_line_error(lad("eval", "--onnx", tmp_path / "other.onnx", *val), "not a lad detector",
                          "inputs x [1,10]; outputs y [1,10]")
    # the same foreign graph carrying a lad graph's metadata: its inputs and outputs still give it away
    helper.set_model_props(other, {p.key: p.value for p in onnx.load(str(path)).metadata_props})
    onnx.save(other, str(tmp_path / "other_with_meta.onnx"))
    assert_one_line_error(lad("show", "--onnx", tmp_path / "other_with_meta.onnx", "--image-id", "1", *val),
                          "not the lad detector its metadata describes", "inputs x [1,10]")

    # a graph whose recorded anchor layout is not the one it decodes on: found at the first batch
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    model = {**json.loads(meta["model"]), "strides": [8, 16, 32, 64]}
    meta.update(model=json.dumps(model), anchor_layout=json.dumps({"strides": [8, 16, 32, 64],
                                                                     "octave_base_scale": model["octave_base_scale"]}))
    del proto.metadata_props[:]
    helper.set_model_props(proto, meta)
    onnx.save(proto, str(tmp_path / "four_levels.onnx"))
    with pytest.raises(LadError, match="gives 341 anchors for a 128x128 input but the anchor layout it records has 340"):
        Predictor.from_onnx(tmp_path / "four_levels.onnx").predict([torch.zeros(3, 128, 128, dtype=torch.uint8)])

    # a graph of 5 classes against annotations of 10
    export_onnx(save_teacher(tmp_path / "five.pth", 0, "model.num_classes=5"), tmp_path / "five.onnx")
    assert_one_line_error(lad("eval", "--onnx", tmp_path / "five.onnx", *val), "10 categories",
                          "predicts 5 classes")


def test_cli_export_of_an_mmengine_checkpoint(reference_dir, tmp_path):
    """The real mmengine checkpoint of the small golden model exports with its --config, and the graph gives
    the PyTorch model's outputs."""
    config = REPO / "configs" / "paa_r18_small.toml"
    result = lad("export", "--checkpoint", reference_dir / "small_r18_paa_mmengine.pth", "--config", config,
                 "--out", tmp_path / "small.onnx")
    assert result.returncode == 0, result.stderr
    model, _, _ = load_detector(reference_dir / "small_r18_paa_mmengine.pth", config)
    images = golden_batch()
    with torch.no_grad():
        expected = DeployedDetector(model).eval()(images)
    assert_parity(expected, OnnxDetector(tmp_path / "small.onnx")(images))


def test_export_help_imports_nothing_heavy():
    code = ("import sys; from click.testing import CliRunner; from cli.export import export_command; "
            "r = CliRunner().invoke(export_command, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'lad_pipeline') if m in sys.modules))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("head", ["paa_cop", "paa_iop_base"])
def test_probability_heads_export_their_own_scores(head, tmp_path):
    """IOP/COP heads output class probabilities (no sigmoid in the graph) and the base variants have no IoU
    branch (the score is the class probability): the graph's detections are PyTorch's."""
    config = tiny_config(f"model.head={head}", "model.num_classes=10")
    torch.manual_seed(0)
    model = build_detector(config.model).eval()
    for p in model.bbox_head.parameters():  # spread the scores so that detections pass the threshold
        p.data.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "model.pth"
    save_checkpoint(ckpt, model, config.to_dict())
    report = export_onnx(ckpt, tmp_path / "model.onnx")
    graph = OnnxDetector(report.path, ["CPUExecutionProvider"])
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = model(images)
    shapes = [(96, 128), (80, 112)]
    boxes, scores = graph(images)
    test = replace(config.test, score_thr=0.0)
    ours = postprocess_decoded(boxes, scores, (96, 128), shapes, anchors=model.anchors, config=test)
    theirs = postprocess(outs, shapes, anchors=model.anchors, config=test)
    assert sum(len(d.labels) for d in theirs) > 0
    assert_same_detections(ours, theirs)
