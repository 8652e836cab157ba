"""Config validation: unknown keys, wrong types, bases, overrides."""
import pickle
import re
from pathlib import Path

import pytest
import yaml

from detector.config import ConfigError, get_cfg, load_cfg, load_yaml_with_base


def test_unknown_key_names_key_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("MODEL:\n  RESNETS:\n    DEPHT: 101\n")
    with pytest.raises(ConfigError) as e:
        load_cfg(f)
    msg = str(e.value)
    assert "MODEL.RESNETS.DEPHT" in msg and "MODEL.RESNETS.DEPTH" in msg and str(f) in msg


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.RESNETS.DEPTH.*int"):
        load_cfg(overrides=["MODEL.RESNETS.DEPTH", "deep"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_cfg("no/such/file.yaml")


def test_base_chain_and_override(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  RESNETS:\n    DEPTH: 101\n  PIXEL_STD: [1, 1, 1]\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nINPUT:\n  MIN_SIZE_TEST: 600\n")
    cfg = load_cfg(tmp_path / "child.yaml", ["INPUT.MAX_SIZE_TEST", "1000"])
    assert cfg.MODEL.RESNETS.DEPTH == 101
    assert cfg.INPUT.MIN_SIZE_TEST == 600 and cfg.INPUT.MAX_SIZE_TEST == 1000
    assert cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="frozen"):
        cfg.INPUT.MIN_SIZE_TEST = 1


def test_circular_base(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_cfg(tmp_path / "a.yaml")


def test_dump_roundtrip_and_pickle(tmp_path):
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    f = tmp_path / "dumped.yaml"
    f.write_text(cfg.dump())
    assert load_cfg(f) == cfg
    assert pickle.loads(pickle.dumps(cfg)).MODEL.RESNETS.DEPTH == 18


# -- every accepted key is read or refused; configs restate no defaults -----------------------------------
REPO = Path(__file__).resolve().parent.parent
CONFIG_MODULES = {*(REPO / "detector" / "config").glob("*.py"), REPO / "e2e_vl" / "config.py"}
# Sections whose keys are read by iterating over the section, not by name.
WHOLE_SECTIONS = {
    "MODEL.VL.LOSS_WEIGHTS": "LOSS_WEIGHTS.items()",  # key = loss name
    "MODEL.VILBERT": "f.name.upper()",  # ViLBertSizes.from_cfg: one field per key
}
# Restated on purpose: the task a config is for, and two choices the comment next to them justifies.
DELIBERATE = {("configs/easy_vqa/base.yaml", "TASK"), ("configs/vqa/vlbert_base_e2e.yaml", "TASK"),
              ("configs/easy_vqa/base.yaml", "MODEL.BACKBONE.FREEZE_AT"),
              ("configs/easy_vqa/base.yaml", "SOLVER.AMP.DTYPE")}


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_default_key_is_read_or_refused():
    from detector.config import DETECTOR_CHOICES
    from e2e_vl.config import _CHOICES, get_train_cfg

    sources = [p for d in ("detector", "e2e_vl", "tools") for p in (REPO / d).rglob("*.py")
               if p not in CONFIG_MODULES]
    text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    # Keys declared by their own module (`register_config`'s dict literals) are not read by being declared.
    text = re.sub(r"register_config\(.*?owner=__name__\)", "", text, flags=re.DOTALL)
    for section, reader in WHOLE_SECTIONS.items():
        assert reader in text, f"{section} is no longer read as a whole ({reader!r} not found)"
    words = set(re.findall(r"\b[A-Z][A-Z0-9_]*\b", text))
    unread = [key for key in _leaves(get_train_cfg()) if key.rsplit(".", 1)[-1] not in words
              and key not in DETECTOR_CHOICES and key not in _CHOICES
              and not any(key.startswith(s + ".") for s in WHOLE_SECTIONS)]
    assert not unread, f"config keys that nothing reads (read, validate or remove them): {unread}"


@pytest.mark.parametrize("key,value", [("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"),
                                       ("MODEL.RPN.HEAD_NAME", "RotatedRPNHead"),
                                       ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128")])
def test_unsupported_detectron2_value_is_refused(key, value):
    from e2e_vl.config import load_train_cfg

    with pytest.raises(ConfigError, match=re.escape(key) + ".*must be"):
        load_cfg(overrides=[key, value])
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_train_cfg(overrides=[key, value])


def test_detectron2_default_restated_is_accepted(tmp_path):
    f = tmp_path / "d2.yaml"
    f.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n  RPN:\n    BATCH_SIZE_PER_IMAGE: 256\n"
                 "    HEAD_NAME: StandardRPNHead\n  ROI_HEADS:\n    NAME: Res5ROIHeads\n"
                 "    POSITIVE_FRACTION: 0.25\n")
    assert load_cfg(f).MODEL.RPN.BATCH_SIZE_PER_IMAGE == 256


def test_configs_restate_no_defaults():
    from e2e_vl.config import get_train_cfg

    restated = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        own = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        bases = own.pop("_BASE_", [])
        parent = get_train_cfg()
        for base in [bases] if isinstance(bases, str) else bases:
            parent.merge_from_dict(load_yaml_with_base(path.parent / base))
        merged = parent.clone().merge_from_dict(own)
        for key in _leaves(own):
            before, after = parent, merged
            for part in key.split("."):
                before, after = before[part], after[part]
            name = str(path.relative_to(REPO))
            if before == after and (name, key) not in DELIBERATE:
                restated.append(f"{name}: {key}")
    assert not restated, f"lines that restate the default (or the _BASE_'s value): {restated}"


def test_config_library_knows_no_keys():
    """The library (CfgNode, loading, merging, errors) is separate from the detector's keys, and the
    package keeps its public names."""
    import detector.config as config
    from detector.config import cfgnode

    source = (REPO / "detector" / "config" / "cfgnode.py").read_text(encoding="utf-8")
    assert not re.search(r"^(from|import) (detector|e2e_vl)", source, re.M)  # it depends on no keys
    assert not hasattr(cfgnode, "get_cfg") and not hasattr(cfgnode, "DETECTOR_CHOICES")
    assert config.CfgNode is cfgnode.CfgNode and config.ConfigError is cfgnode.ConfigError
    assert ({"get_cfg", "load_cfg", "load_yaml_with_base", "check_choices", "validate_detector_cfg"}
            <= set(dir(config)))


def test_answer_segment_is_vlbert_s_for_vqa_v2_and_the_measured_one_for_the_demo():
    from e2e_vl.config import load_train_cfg

    def segment(config: str) -> int:  # no weights: a fresh clone has not written the demo's detector yet
        return load_train_cfg(REPO / "configs" / config, ["MODEL.WEIGHTS", ""]).DATASETS.ANSWER_SEGMENT

    assert segment("vqa/vlbert_base_e2e.yaml") == 1 and segment("vqa/tiny.yaml") == 1
    assert segment("easy_vqa/e2e.yaml") == 0 and segment("easy_vqa/visualbert.yaml") == 0
    with pytest.raises(ConfigError, match="DATASETS.ANSWER_SEGMENT' must be 0 or 1, got 2"):
        load_train_cfg(overrides=["DATASETS.ANSWER_SEGMENT", "2"])


@pytest.mark.parametrize("config,overrides,named", [
    # The case: the config trains 20 epochs, the command line asks for 3 steps.
    ("refcoco/vlbert_base_e2e.yaml", ["SOLVER.MAX_ITER", "3"],
     ["'SOLVER.MAX_ITER' 3", "'SOLVER.MAX_EPOCHS' 20.0", "SOLVER.MAX_EPOCHS 0 SOLVER.MAX_ITER 3"]),
    ("easy_vqa/e2e.yaml", ["SOLVER.MAX_EPOCHS", "2"], ["'SOLVER.MAX_ITER' 1500", "'SOLVER.MAX_EPOCHS' 2.0"]),
    ("easy_vqa/e2e.yaml", ["SOLVER.DECAY_AT", "[0.5]"], ["'SOLVER.DECAY_AT'", "'SOLVER.LR_SCHEDULER' step"]),
    ("vcr/vlbert_base_e2e.yaml", ["SOLVER.LR_SCHEDULER", "linear"], ["'SOLVER.DECAY_AT'", "'linear'"]),
    ("easy_vqa/e2e.yaml", ["SOLVER.LR_SCHEDULER", "step"],
     ["'SOLVER.LR_SCHEDULER' step", "'SOLVER.DECAY_AT'"]),
    ("easy_vqa/e2e.yaml", ["SOLVER.LR_SCHEDULER", "constant", "SOLVER.MIN_LR_FACTOR", "0.1"],
     ["'SOLVER.MIN_LR_FACTOR' 0.1", "'constant'"]),
    ("easy_vqa/e2e.yaml", ["SOLVER.WARMUP_ITERS", "0", "SOLVER.WARMUP_FACTOR", "0.1"],
     ["'SOLVER.WARMUP_FACTOR' 0.1", "'SOLVER.WARMUP_ITERS' 0"]),
])
def test_two_keys_that_disagree_are_one_error_naming_both(config, overrides, named):
    """No silent precedence (issue 27): a key that another key would make moot is refused, naming both."""
    from e2e_vl.config import load_train_cfg

    with pytest.raises(ConfigError) as e:
        load_train_cfg(REPO / "configs" / config, ["MODEL.WEIGHTS", "", *overrides])
    assert all(name in str(e.value) for name in named), str(e.value)


def test_the_run_length_is_set_by_one_key_and_the_log_says_which():
    from e2e_vl.config import load_train_cfg, run_length_notes

    cfg = load_train_cfg(REPO / "configs" / "refcoco" / "vlbert_base_e2e.yaml",
                         ["MODEL.WEIGHTS", "", "SOLVER.MAX_EPOCHS", "0", "SOLVER.MAX_ITER", "3"])
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.MAX_EPOCHS) == (3, 0.0)
    source, warnings = run_length_notes(cfg, 3)
    assert source == "SOLVER.MAX_ITER 3"
    assert warnings == ["'SOLVER.WARMUP_ITERS' 3750 >= the run's 3 steps (SOLVER.MAX_ITER 3): the learning "
                        "rate never leaves the warm-up (lower WARMUP_ITERS for a short run)"]
    epochs = load_train_cfg(REPO / "configs" / "refcoco" / "vlbert_base_e2e.yaml", ["MODEL.WEIGHTS", ""])
    assert run_length_notes(epochs, 75400) == ("SOLVER.MAX_EPOCHS 20.0", [])
