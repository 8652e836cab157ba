"""tools/export_detector.py: a jointly trained detector handed back as a stand-alone checkpoint."""
import contextlib
import errno
import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from detector.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from detector.config import CfgNode, get_cfg, load_cfg
from detector.config.detectron2_keys import add_vg_config, check_stock_detectron2
from detector.modeling import build_detector

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "easy_vqa" / "e2e.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (very short) end-to-end training run of the easy-VQA model."""
    out = tmp_path_factory.mktemp("run")
    rc = _tool("train_net").cli([
        "--config-file", str(CONFIG), "--output-dir", str(out), "MODEL.WEIGHTS", "",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.AMP.DTYPE", "none", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN_LIMIT", "40", "DATASETS.TEST_LIMIT", "10", "TEST.IMS_PER_BATCH", "2",
    ])
    assert rc == 0
    return out


def _run_state(run_dir: Path) -> dict:
    ckpts = sorted(run_dir.glob("model_*.pth"))
    ckpts = [p for p in ckpts if p.name != "model_best.pth"]
    return torch.load(ckpts[-1], map_location="cpu", weights_only=True)


def _run_detector(run_dir: Path, seed: int) -> nn.Module:
    """A randomly initialised detector of the run's architecture (read from its checkpoint's config)."""
    cfg = _tool("export_detector").detector_cfg_from_run(_run_state(run_dir), str(run_dir))
    torch.manual_seed(seed)
    return build_detector(cfg)


def _config_of(weights: Path) -> Path:
    """The detector config the export writes beside `weights` (OUTPUT.yaml)."""
    return weights.with_name(weights.name + ".yaml")


def _detector_cfg(yaml_file: Path):
    cfg = get_cfg()
    cfg.merge_from_file(yaml_file)
    return cfg


def _fast_rcnn(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 128, 128, generator=g) * 255
    boxes = [torch.tensor([[0.0, 0.0, 127.0, 127.0], [20.0, 30.0, 90.0, 100.0]])]
    model.eval()
    with torch.no_grad():
        return model.fast_rcnn(model.preprocess_image(image), boxes)


def _export(run_dir, out, *extra) -> int:
    return _tool("export_detector").cli(["--checkpoint", str(run_dir), "--output", str(out), *extra])


@pytest.mark.parametrize("suffix", [".pth", ".pkl", ".safetensors"])
def test_export_without_base_reproduces_the_run_detector(run_dir, tmp_path, suffix):
    out = tmp_path / f"detector{suffix}"
    assert _export(run_dir, out) == 0
    cfg = _detector_cfg(_config_of(out))
    exported = build_detector(cfg)
    load_checkpoint(exported, out, strict=True)

    inside = build_detector(cfg)
    state = _run_state(run_dir)["model"]
    inside.load_state_dict({k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")})
    a, b = _fast_rcnn(exported), _fast_rcnn(inside)
    for key in ("features", "class_logits"):
        assert torch.equal(a[key], b[key]), key


def test_untouched_parts_come_from_base_bit_for_bit(run_dir, tmp_path):
    base_model = _run_detector(run_dir, 1234)
    base_file = tmp_path / "base.pkl"
    save_checkpoint(base_model, base_file, fmt="pkl")
    base = base_model.state_dict()

    out = tmp_path / "with_base.safetensors"
    assert _export(run_dir, out, "--base-weights", str(base_file)) == 0
    sd, _ = read_checkpoint(out)
    trained = {k[len("detector."):]: v
               for k, v in _run_state(run_dir)["model"].items() if k.startswith("detector.")}
    for key, value in sd.items():
        if key.startswith(("backbone.", "roi_heads.res5.")):
            assert torch.equal(value, trained[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, base[key]), key
    # The run really moved the trunk away from its initialisation (so the check above means something).
    assert not all(torch.equal(trained[k], base[k]) for k in sd if k.startswith("backbone.res4"))


def test_exported_weights_run_in_extract_rois(run_dir, tmp_path):
    out = tmp_path / "detector.pth"
    assert _export(run_dir, out) == 0
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"),
                    np.random.default_rng(i).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    rc = _tool("extract_rois").main([
        "--config-file", str(_config_of(out)), "--weights", str(out), "--input", str(images),
        "--output", str(tmp_path / "store"), "--min-boxes", "2", "--max-boxes", "4", "--num-workers", "0",
        "--no-progress", "--device", "cpu",
    ])
    assert rc == 0
    from detector.roi_store import RoIStore

    assert len(RoIStore(tmp_path / "store")) == 2


def test_provenance_is_recorded(run_dir, tmp_path):
    from detector.checkpoint import read_checkpoint

    out = tmp_path / "detector.safetensors"
    assert _export(run_dir, out) == 0
    _, meta = read_checkpoint(out)
    assert meta["step"] == "2" and len(meta["config_sha256"]) == 64 and len(meta["checkpoint_sha256"]) == 64
    assert meta["exported_from"].endswith(".pth") and "RESNETS" in meta["config"]


def test_clear_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "d.pth"
    assert _export(run_dir, out) == 0
    assert _export(run_dir, out) == 2
    assert "exists" in capsys.readouterr().err
    assert _export(run_dir, out, "--overwrite") == 0

    # A checkpoint without a detector.
    state = _run_state(run_dir)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("detector.")}
    bare = tmp_path / "no_detector" / "model_0000002.pth"
    bare.parent.mkdir()
    torch.save(state, bare)
    assert _export(bare, tmp_path / "x.pth") == 2
    assert "no detector" in capsys.readouterr().err

    # Base weights of another architecture (ResNet-34 trunk vs the run's ResNet-18).
    cfg = _detector_cfg(_config_of(out))
    cfg.MODEL.RESNETS.DEPTH = 34
    other = tmp_path / "r34.pth"
    save_checkpoint(build_detector(cfg), other)
    assert _export(run_dir, tmp_path / "y.pth", "--base-weights", str(other)) == 2
    assert "backbone.res3.3.conv1.weight" in capsys.readouterr().err

    assert _export(tmp_path / "nowhere", tmp_path / "z.pth") == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.detectron2
def test_detectron2_loads_the_export_strictly_and_agrees(run_dir, tmp_path):
    """A stock Detectron2 reads the exported YAML with its own get_cfg().merge_from_file after the one
    documented snippet, builds the network from it, loads the weights with nothing missing, unexpected or
    of another shape, and computes the same region features and class scores."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes

    out = tmp_path / "detector.pth"
    assert _export(run_dir, out) == 0
    ours = build_detector(_detector_cfg(_config_of(out)))
    load_checkpoint(ours, out, strict=True)

    d2_cfg = add_vg_config(d2_get_cfg())
    d2_cfg.merge_from_file(str(_config_of(out)))
    check_stock_detectron2(d2_cfg)
    d2_cfg.MODEL.DEVICE = "cpu"
    theirs = build_model(d2_cfg).eval()
    checkpointer = DetectionCheckpointer(theirs)
    seen = []
    checkpointer._log_incompatible_keys = seen.append  # Detectron2 only logs these; we want them empty
    checkpointer.load(str(out))
    assert len(seen) == 1
    assert not seen[0].missing_keys and not seen[0].unexpected_keys and not seen[0].incorrect_shapes

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 12.0, 40.0, 50.0]])
    ours.eval()
    with torch.no_grad():
        mine = ours.fast_rcnn(ours.preprocess_image(image), [boxes])
        x = (image - theirs.pixel_mean) / theirs.pixel_std
        res4 = theirs.backbone(x)["res4"]
        ref = theirs.roi_heads._shared_roi_transform([res4], [Boxes(boxes)]).mean(dim=(2, 3))
        ref_scores, _ = theirs.roi_heads.box_predictor(ref)
    assert (mine["features"] - ref).abs().max().item() <= 1e-4
    assert (mine["class_logits"] - ref_scores).abs().max().item() <= 1e-4


# --- the exported YAML is Detectron2's config plus add_vg_config, and cannot drift from it ---------------
D2_DEFAULTS = REPO / "tests" / "data" / "detectron2_v0.6_defaults.yaml"


def _stock_detectron2_cfg() -> CfgNode:
    """Detectron2 v0.6's defaults for the keys we export (tests/data), with the VG snippet applied."""
    return add_vg_config(CfgNode(yaml.safe_load(D2_DEFAULTS.read_text())))


def _merge_like_yacs(node: dict, data: dict, prefix: str = "") -> None:
    """Detectron2's (yacs) merge rules: every key must exist, values keep their type (lists and tuples
    interchange; an int is not a float)."""
    for key, value in data.items():
        full = prefix + key
        assert key in node, f"{full}: neither a Detectron2 key nor one add_vg_config adds"
        default = node[key]
        if isinstance(default, dict):
            _merge_like_yacs(default, value, full + ".")
        else:
            assert type(value) is type(default) or {type(value), type(default)} <= {list, tuple}, (
                f"{full}: {value!r} where Detectron2 expects {type(default).__name__}")


def test_exported_yaml_is_detectron2_config_plus_the_vg_snippet(run_dir, tmp_path):
    out = tmp_path / "detector.pth"
    assert _export(run_dir, out) == 0
    exported = yaml.safe_load(_config_of(out).read_text())
    _merge_like_yacs(_stock_detectron2_cfg().to_dict(), exported)
    # the VG keys are written, under the names the Detectron2 ports use
    assert exported["MODEL"]["CAFFE_MAXPOOL"] is False and exported["MODEL"]["ATTRIBUTE_ON"] is False
    assert exported["MODEL"]["ROI_BOX_HEAD"]["RES5HALVE"] is True
    assert set(exported["MODEL"]["ROI_ATTRIBUTE_HEAD"]) == {"NUM_CLASSES", "OBJ_EMBED_DIM", "FC_DIM"}


def test_vg_config_is_refused_for_stock_detectron2():
    """The VG model's keys merge, and stock Detectron2 (which ignores them) is told before it builds
    another network silently."""
    vg = load_cfg(REPO / "configs" / "vg" / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml")
    stock = _stock_detectron2_cfg()
    _merge_like_yacs(stock.to_dict(), vg.to_dict())
    stock.merge_from_dict(vg.to_dict())
    with pytest.raises(ValueError, match="MODEL.CAFFE_MAXPOOL is True: stock Detectron2 ignores"):
        check_stock_detectron2(stock)
    check_stock_detectron2(_stock_detectron2_cfg())  # the stock values pass


def test_add_vg_config_keeps_keys_a_port_already_has():
    cfg = CfgNode(yaml.safe_load(D2_DEFAULTS.read_text()))
    cfg.MODEL.CAFFE_MAXPOOL = True  # py-bottom-up-attention's fork declares it
    add_vg_config(cfg)
    assert cfg.MODEL.CAFFE_MAXPOOL is True and cfg.MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM == 512


# --- --base-weights fills only what the run did not train ------------------------------------------------
@pytest.fixture(scope="module")
def regions_run_dir(tmp_path_factory) -> Path:
    """A 2-step region-classification run (the demo's stage 1): it trains the box predictor's cls_score."""
    out = tmp_path_factory.mktemp("regions")
    rc = _tool("train_net").cli([
        "--config-file", str(REPO / "configs" / "easy_vqa" / "detector.yaml"), "--output-dir", str(out),
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.AMP.DTYPE", "none", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN_LIMIT", "4", "DATASETS.TEST_LIMIT", "2", "TEST.IMS_PER_BATCH", "2",
    ])
    assert rc == 0
    return out


CLS = "roi_heads.box_predictor.cls_score.weight"


def test_base_weights_never_replace_what_the_run_trained(regions_run_dir, tmp_path, capsys):
    state = _run_state(regions_run_dir)
    run_cls = state["model"]["detector." + CLS]
    base_model = _run_detector(regions_run_dir, 99)
    base_file = tmp_path / "random_base.pth"
    save_checkpoint(base_model, base_file)
    base_rpn = base_model.state_dict()["proposal_generator.rpn_head.conv.weight"]

    out = tmp_path / "with_base.pth"
    assert _export(regions_run_dir, out, "--base-weights", str(base_file)) == 0
    sd, _ = read_checkpoint(out)
    assert torch.equal(sd[CLS], run_cls)  # trained: kept
    assert torch.equal(sd["proposal_generator.rpn_head.conv.weight"], base_rpn)  # untrained: from the base
    assert "kept over the base" in capsys.readouterr().out
    assert "detector." + CLS in state["trained_parameters"]  # what the run recorded

    # The user asks for the base's head anyway.
    taken = tmp_path / "base_head.pth"
    assert _export(regions_run_dir, taken, "--base-weights", str(base_file), "--take-base-head") == 0
    assert torch.equal(read_checkpoint(taken)[0][CLS], base_model.state_dict()[CLS])

    # A checkpoint that does not say what was trained: refused with --base-weights, unless asked.
    del state["trained_parameters"]
    old = tmp_path / "old_run" / "model_0000002.pth"
    old.parent.mkdir()
    torch.save(state, old)
    assert _export(old, tmp_path / "o.pth", "--base-weights", str(base_file)) == 2
    assert "--take-base-head" in capsys.readouterr().err


# --- damaged inputs, suffixes, writes ---------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("export_detector: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["crc", "empty", "text"])
def test_damaged_training_checkpoint_is_refused_in_one_line(run_dir, tmp_path, capsys, damage_zip, damage):
    bad = tmp_path / "run" / "model_0000002.pth"
    bad.parent.mkdir()
    src = sorted(p for p in run_dir.glob("model_*.pth") if p.name != "model_best.pth")[-1]
    if damage == "crc":
        damage_zip(src, bad)
    else:
        bad.write_bytes(b"" if damage == "empty" else b"step: 2\nmodel: weights.pth\n")
    assert _export(bad, tmp_path / "out.pth") == 2
    err = _one_line_error(capsys)
    assert str(bad) in err and err.count(str(bad)) == 1
    assert {"crc": "fails its CRC check", "empty": "too short",
            "text": "unrecognised checkpoint format"}[damage] in err
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("damage", ["crc", "nonfinite"])
def test_damaged_base_weights_are_refused(run_dir, tmp_path, capsys, damage_zip, damage):
    good = _run_detector(run_dir, 0)
    base = tmp_path / "base.pth"
    if damage == "nonfinite":
        with torch.no_grad():
            good.roi_heads.box_predictor.cls_score.weight[0, 0] = float("nan")
        save_checkpoint(good, base)
    else:
        save_checkpoint(good, tmp_path / "whole.pth")
        damage_zip(tmp_path / "whole.pth", base)
    assert _export(run_dir, tmp_path / "out.pth", "--base-weights", str(base)) == 2
    err = _one_line_error(capsys)
    assert str(base) in err and ("fails its CRC check" if damage == "crc" else "non-finite") in err


@pytest.mark.parametrize("output, fmt", [("w.yaml", "detectron2"), ("w.pkl", "safetensors"),
                                         ("w.pth", "pkl"), ("w.bin", None)])
def test_suffix_and_format_must_agree(run_dir, tmp_path, capsys, output, fmt):
    args = ["--format", fmt] if fmt else []
    assert _export(run_dir, tmp_path / output, *args) == 2
    assert "suffix" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_config_never_replaces_weights_and_formats_do_not_collide(run_dir, tmp_path):
    for suffix in (".pth", ".safetensors", ".pkl"):
        assert _export(run_dir, tmp_path / f"detector{suffix}") == 0
    for suffix in (".pth", ".safetensors", ".pkl"):
        weights = tmp_path / f"detector{suffix}"
        model = build_detector(_detector_cfg(_config_of(weights)))
        load_checkpoint(model, weights, strict=True)


def test_failed_write_leaves_nothing_behind(run_dir, tmp_path, capsys, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as file:
            file.write(b"x" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "out" / "detector.pth"
    assert _export(run_dir, out) == 2
    assert "No space left on device" in _one_line_error(capsys)
    assert list(out.parent.iterdir()) == []


def test_exports_get_the_same_file_mode(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        for suffix in (".pth", ".pkl", ".safetensors"):
            assert _export(run_dir, tmp_path / f"d_{suffix[1:]}{suffix}") == 0
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
