"""Config validation: unknown keys, wrong types, bases, overrides."""
import pickle

import pytest

from detector.config import ConfigError, get_cfg, load_cfg


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
