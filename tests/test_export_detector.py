"""tools/export_detector.py: a jointly trained detector handed back as a stand-alone checkpoint."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.checkpoint import load_checkpoint, save_checkpoint
from detector.config import get_cfg
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
    cfg = _detector_cfg(out.with_suffix(".yaml"))
    exported = build_detector(cfg)
    load_checkpoint(exported, out, strict=True)

    inside = build_detector(cfg)
    state = _run_state(run_dir)["model"]
    inside.load_state_dict({k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")})
    a, b = _fast_rcnn(exported), _fast_rcnn(inside)
    for key in ("features", "class_logits"):
        assert torch.equal(a[key], b[key]), key


def test_untouched_parts_come_from_base_bit_for_bit(run_dir, tmp_path):
    assert _export(run_dir, tmp_path / "plain.pth") == 0
    cfg = _detector_cfg(tmp_path / "plain.yaml")
    torch.manual_seed(1234)
    base_model = build_detector(cfg)
    base_file = tmp_path / "base.pkl"
    save_checkpoint(base_model, base_file, fmt="pkl")
    base = base_model.state_dict()

    out = tmp_path / "with_base.safetensors"
    assert _export(run_dir, out, "--base-weights", str(base_file)) == 0
    exported = build_detector(cfg)
    load_checkpoint(exported, out, strict=True)
    sd = exported.state_dict()
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
        "--config-file", str(out.with_suffix(".yaml")), "--weights", str(out), "--input", str(images),
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
    cfg = _detector_cfg(out.with_suffix(".yaml"))
    cfg.MODEL.RESNETS.DEPTH = 34
    other = tmp_path / "r34.pth"
    save_checkpoint(build_detector(cfg), other)
    assert _export(run_dir, tmp_path / "y.pth", "--base-weights", str(other)) == 2
    assert "backbone.res3.3.conv1.weight" in capsys.readouterr().err

    assert _export(tmp_path / "nowhere", tmp_path / "z.pth") == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.detectron2
def test_detectron2_loads_the_export_strictly_and_agrees(run_dir, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes

    out = tmp_path / "detector.pth"
    assert _export(run_dir, out) == 0
    ours = build_detector(_detector_cfg(out.with_suffix(".yaml")))
    load_checkpoint(ours, out, strict=True)

    # Detectron2's C4 config from the exported one: every key Detectron2 also has (ours are its names).
    d2_cfg = d2_get_cfg()
    d2_cfg.merge_from_list(["MODEL.MASK_ON", "False", "MODEL.ROI_HEADS.NAME", "Res5ROIHeads"])
    pairs: list = []

    def flatten(node: dict, d2_node, prefix: str) -> None:
        for key, value in node.items():
            if key not in d2_node:
                continue
            if isinstance(value, dict):
                flatten(value, d2_node[key], f"{prefix}{key}.")
            else:
                pairs.extend([f"{prefix}{key}", value if isinstance(value, str) else repr(value)])

    import yaml

    flatten(yaml.safe_load(out.with_suffix(".yaml").read_text()), d2_cfg, "")
    d2_cfg.merge_from_list(pairs)
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
        mine = ours.fast_rcnn(ours.preprocess_image(image), [boxes])["features"]
        x = (image - theirs.pixel_mean) / theirs.pixel_std
        res4 = theirs.backbone(x)["res4"]
        ref = theirs.roi_heads._shared_roi_transform([res4], [Boxes(boxes)]).mean(dim=(2, 3))
    assert (mine - ref).abs().max().item() <= 1e-4
