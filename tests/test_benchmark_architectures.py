"""benchmarks/architectures.py: each row is a real train_net run whose result is stored beside it and read
back with --reuse only when the same command made it; wall times are given against VL-BERT's joint run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_architectures", REPO / "benchmarks" / "architectures.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)

TINY = ["--steps", "2", "--threads", "1", "--archs", "vlbert",
        "MODEL.WEIGHTS", "", "DATASETS.TEST_LIMIT", "8", "DATALOADER.NUM_WORKERS", "0"]


def row(arch: str, setting: str, wall: float) -> dict:
    return {"arch": arch, "setting": setting, "seed": 0, "wall_s": wall, "images_per_s": 10.0,
            "params": dict.fromkeys(bench.PARAMETER_KINDS, 1_000_000),
            "metrics": {"accuracy": 0.5, "yes/no": 0.5, "colour": 0.5, "shape": 0.5}}


def test_table_gives_each_wall_time_against_vlbert_joint():
    text = bench.markdown_table([row("vlbert", "joint", 500.0), row("lxmert", "joint", 900.0),
                                 row("lxmert", "frozen", 450.0)])
    assert "| vlbert | joint | 0 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 500 | 1.00 |" in text
    assert "| lxmert | joint | 0 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 900 | 1.80 |" in text
    assert "| lxmert | frozen | 0 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 450 | 0.90 |" in text
    assert "| 500 | - |" in bench.markdown_table([row("lxmert", "joint", 500.0)])


@pytest.mark.slow(minutes=0.5)
def test_a_run_is_stored_and_read_back_only_for_the_same_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    assert bench.main([*TINY[:6], "--out", str(out), "--json", str(tmp_path / "t.json"), *TINY[6:]]) == 0
    stored = json.loads((out / "vlbert-joint-seed0" / "result.json").read_text())
    assert stored["command"][:4] == ["tools/train_net.py", "--config-file", "configs/easy_vqa/base.yaml",
                                     "--output-dir"]
    assert 8 <= stored["metrics"]["questions"] < 100 and stored["images_per_s"] > 0
    assert stored["params"]["bert"] > stored["params"]["head"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["results"] == [stored]
    assert "| vlbert | joint | 0 |" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(bench, "run", no_training)
    assert bench.main([*TINY[:6], "--out", str(out), "--reuse", *TINY[6:]]) == 0  # read back
    with pytest.raises(AssertionError, match="trained again"):  # another command is another run
        bench.main([*TINY[:6], "--out", str(out), "--reuse", *TINY[6:], "SEED", "0"])
    # The same command from another stage-1 file is another run too.
    assert stored["detector"] == ""  # MODEL.WEIGHTS ""
    stored["detector"] = "0" * 64
    (out / "vlbert-joint-seed0" / "result.json").write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="trained again"):
        bench.main([*TINY[:6], "--out", str(out), "--reuse", *TINY[6:]])


def test_the_starting_detector_is_told_by_its_content(tmp_path):
    weights = tmp_path / "detector.pth"
    weights.write_bytes(b"stage 1")
    config = REPO / "configs" / "easy_vqa" / "base.yaml"
    first = bench.starting_detector(config, ["MODEL.WEIGHTS", str(weights)])
    assert len(first) == 64 and bench.starting_detector(config, ["MODEL.WEIGHTS", ""]) == ""
    weights.write_bytes(b"stage 1, trained again")
    assert bench.starting_detector(config, ["MODEL.WEIGHTS", str(weights)]) != first
