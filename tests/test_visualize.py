"""What the model sees (issue 32): attention pictures and numbers for every architecture, the grounding
analysis, readable region pictures with a contact sheet, and the training curve of a run.

Runs are the easy-VQA smoke model (configs/easy_vqa/smoke.yaml, 64 px images): VL-BERT trained for three
steps by tools/train_net.py (conftest's `trained_run`, so its folder is a real run's), the other
architectures built and saved as a run folder holds them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from e2e_vl.visualize.attention import AttentionSite, attention_probabilities, record_projections
from e2e_vl.visualize.drawing import PALETTE
from e2e_vl.visualize.grounding import GroundingCase, grounding_table
from tiny import FLICKR_SENTENCES, write_flickr30k

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "easy_vqa" / "smoke.yaml"
TOOLS = REPO / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


visualize_attention = load_tool("visualize_attention")
plot_run = load_tool("plot_run")


def saved_run(arch: str, folder: Path) -> Path:
    """A run folder of `arch` (config.yaml + weights-only model_best.pth) without training it."""
    from e2e_vl.config import load_train_cfg
    from e2e_vl.modeling import build_model

    cfg = load_train_cfg(SMOKE, ["MODEL.ARCH", arch, "OUTPUT_DIR", str(folder)])
    torch.manual_seed(0)
    model = build_model(cfg, arch)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.dump())
    torch.save({"model": model.state_dict(), "step": 0}, folder / "model_best.pth")
    return folder


@pytest.fixture(scope="module", params=["vlbert", "visualbert", "lxmert", "vilbert"])
def run_of_each_arch(request, trained_run, tmp_path_factory) -> tuple[str, Path]:
    arch = request.param
    return arch, trained_run if arch == "vlbert" else saved_run(arch, tmp_path_factory.mktemp(arch) / "run")


def easy_image(image_id: int = 3) -> tuple[np.ndarray, np.ndarray]:
    from e2e_vl.data.easy_vqa import EasyVQAImages

    return EasyVQAImages("test", [image_id])(image_id)


def colour_pixels(picture: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.asarray(picture) == np.array(colour, np.uint8)).all(axis=2).sum())


# -- item 1: attention ---------------------------------------------------------------------------------------
def test_recorded_attention_is_the_eager_attention_whatever_the_kernel():
    """The hooks give exactly what eager attention returns, also when the layers run SDPA."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=16)
    ids = torch.randint(0, 50, (1, 7))
    models = {}
    for kind in ("eager", "sdpa"):
        config._attn_implementation = kind
        models[kind] = BertModel(config).eval()
    eager, sdpa = models["eager"], models["sdpa"]
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    expected = eager(ids, output_attentions=True).attentions
    for model in (eager, sdpa):
        sites = [AttentionSite(f"layer{i}", layer.attention.self, 4, True)
                 for i, layer in enumerate(model.encoder.layer)]
        with record_projections(sites) as found:
            model(ids)
        for proj, want in zip(found, expected):
            got = attention_probabilities(proj["query"], proj["key"], 4)
            torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-6)


def test_recorded_vilbert_cross_attention_reproduces_its_output():
    """ViLBERT's co-attention runs fused SDPA: the recorded probabilities times its values are its output."""
    from e2e_vl.modeling.vilbert import CrossAttention

    torch.manual_seed(0)
    cross = CrossAttention(8, 12, 16, 2, dropout=0.0).eval()
    hidden, context = torch.randn(1, 5, 8), torch.randn(1, 4, 12)
    site = AttentionSite("co", cross, 2, False, region_offset=1)
    with record_projections([site]) as found:
        out = cross(hidden, context, torch.zeros(1, 1, 1, 4))
    probs = attention_probabilities(found[0]["query"], found[0]["key"], 2)  # [H, 5, 4]
    values = cross.value(context)[0].view(4, 2, 8).transpose(0, 1)  # [H, 4, 8]
    torch.testing.assert_close((probs @ values).transpose(0, 1).reshape(1, 5, 16), out, rtol=1e-5, atol=1e-6)


def test_look_draws_the_regions_and_attention_of_every_architecture(run_of_each_arch, tmp_path):
    from e2e_vl.data.easy_vqa import REGION_CLASSES
    from e2e_vl.visualize import pictures
    from e2e_vl.visualize.run_model import answer_names, load_run

    arch, run = run_of_each_arch
    cfg, model, _ = load_run(run)
    image, stored = easy_image()
    boxes = pictures.whole_image_first(np.concatenate([stored[1:], [[5, 5, 30, 30]]]), 64, 64)
    names = answer_names(cfg, model)
    look = pictures.look(model, image, boxes, "is there a circle?", 64, 64, names, REGION_CLASSES, top_k=3)
    # the regions: all three drawn, each outline in its own colour, labels from the task's classes
    assert len(look.drawn) == 3 and [d.color for d in look.drawn] == PALETTE[:3]
    assert look.regions_picture.width >= 480  # a 64 px image is scaled up to be readable
    for d in look.drawn:
        x1, y1, x2, y2 = d.xyxy
        assert colour_pixels(look.regions_picture.crop((x1, y1, x2 + 1, y2 + 1)), d.color) > x2 - x1
    assert look.labels[0] == "whole image" and all(label.split()[-2] in REGION_CLASSES[-1].split() + [
        w for c in REGION_CLASSES for w in c.split()] for label in look.labels[1:])
    # the answers: the run's answer names, best first, probabilities in [0, 1]
    probs = [p for _, p in look.explanation.answers]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert {a for a, _ in look.explanation.answers} <= set(names)
    # the attention: every site, [heads, words, regions + rest], each word's row a distribution
    tokens = look.explanation.tokens
    assert tokens[:6] == ["[CLS]", "is", "there", "a", "circle", "?"]
    expected_sites = {"vlbert": "layer", "visualbert": "layer", "lxmert": "x_layer", "vilbert": "co_layer"}
    attention = look.explanation.attention
    assert attention and all(name.startswith(expected_sites[arch]) for name in attention)
    for att in attention.values():
        assert att.shape[1:] == (len(tokens), 4) and (att >= 0).all()
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    site = next(iter(attention))
    written = pictures.write_look(look, pictures.attention_pictures(look, image, [site], [0]), tmp_path)
    assert {p.name for p in written} == {"regions.png", f"attention_{site}_head0.png", "look.json"}
    record = json.loads((tmp_path / "look.json").read_text())
    assert record["labels"] == look.labels and len(record["boxes"]) == 3
    np.testing.assert_allclose(np.array(record["attention"][site]).sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="heads \\[99\\]"):
        pictures.attention_pictures(look, image, [site], [99])


def test_visualize_attention_tool_writes_pictures_and_refuses_bad_input(trained_run, tmp_path, capsys):
    image = tmp_path / "shape.png"
    Image.fromarray(np.ascontiguousarray(easy_image()[0][..., ::-1])).save(image)
    assert visualize_attention.main([str(trained_run), "--image", str(image), "--box", "10,10,40,40",
                                     "--text", "what shape is it?", "--sites", "layer5", "--heads", "0", "1",
                                     "--output", str(tmp_path / "vis")]) == 0
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [
        "attention_layer5_head0.png", "attention_layer5_head1.png", "look.json", "regions.png"]
    assert "2 regions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main([str(trained_run), "--image", str(image), "--box", "40,10,10,40",
                                  "--output", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "--box '40,10,10,40'" in capsys.readouterr().err
    assert visualize_attention.main([str(tmp_path / "nowhere"), "--easy-vqa", "3", "--output",
                                     str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and err.strip().count("\n") == 0
    assert visualize_attention.main([str(trained_run), "--easy-vqa", "3", "--sites", "x_layer0",
                                     "--output", str(tmp_path / "bad")]) == 2
    assert "unknown attention sites ['x_layer0']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# -- item 2: grounding -----------------------------------------------------------------------------------
def test_grounding_table_scores_the_grounding_head_one_and_computes_the_baseline():
    regions = np.array([[0, 0, 64, 64], [0, 0, 20, 20], [30, 30, 60, 60]], float)
    gt = np.array([[32, 31, 61, 60]], float)  # IoU with region 2 ~0.87, with the others < 0.5

    def case(confidences):
        att = {"layer0": np.zeros((2, 4, 4)), "layer1": np.zeros((2, 4, 4))}
        for a in att.values():
            a[..., 0] = 1.0  # every head looks at the whole image ...
        att["layer1"][0, 3] = [0.1, 0.1, 0.7, 0.1]  # ... but layer 1 head 0 grounds the entity's last piece
        att["layer1"][0, 2] = [0.1, 0.8, 0.0, 0.1]  # (its first piece looks elsewhere: not the one scored)
        return GroundingCase(att, regions, np.array(confidences), [([2, 3], gt)])

    table = grounding_table([case([0.2, 0.9, 0.5]), case([0.1, 0.3, 0.8])])
    assert table.num_entities == 2
    np.testing.assert_array_equal(table.accuracy["layer1"], [1.0, 0.0])
    np.testing.assert_array_equal(table.accuracy["layer0"], [0.0, 0.0])
    assert table.baseline == 0.5  # highest confidence: region 1 (miss), then region 2 (hit)
    assert "| layer1 | 1.000 | 0.000 | 1.000 |" in table.markdown()


def test_easy_vqa_grounding_tool_writes_table_plot_and_numbers(trained_run, tmp_path):
    assert visualize_attention.main([str(trained_run), "--grounding", "6", "--output", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "grounding.json").read_text())
    assert record["num_entities"] == 6 and 0 <= record["baseline"] <= 1
    assert list(record["accuracy"]) == [f"layer{i}" for i in range(6)]
    assert all(0 <= a <= 1 for accs in record["accuracy"].values() for a in accs)
    assert "Baseline (region of highest detector confidence)" in (tmp_path / "grounding.md").read_text()
    plot = Image.open(tmp_path / "grounding.png").convert("RGB")
    assert colour_pixels(plot, PALETTE[2]) > 100  # the baseline's line is drawn


def test_flickr30k_grounding_tool_counts_every_boxed_phrase_and_names_a_missing_split(trained_run, tmp_path,
                                                                                       capsys):
    root = write_flickr30k(tmp_path / "flickr30k")

    def grounding(*args: str) -> int:
        return visualize_attention.main([str(trained_run), "--grounding", "5", "--flickr30k", str(root),
                                         *args])

    out = tmp_path / "train"
    assert grounding("--split", "train", "--rois", "rois", "--output", str(out)) == 0
    record = json.loads((out / "grounding.json").read_text())
    # six phrases with a box; chain 0 (notvisual), the scene chain and the nobndbox chain are left out
    assert record["num_entities"] == 6 and 0 <= record["baseline"] <= 1
    assert list(record["accuracy"]) == [f"layer{i}" for i in range(6)]
    assert "6 entities" in (out / "grounding.md").read_text()
    assert colour_pixels(Image.open(out / "grounding.png").convert("RGB"), PALETTE[2]) > 100
    # the annotation's boxes as candidates (no --rois): val's three phrases with a box
    assert grounding("--output", str(tmp_path / "val")) == 0
    assert json.loads((tmp_path / "val" / "grounding.json").read_text())["num_entities"] == 3
    capsys.readouterr()
    assert grounding("--split", "test", "--rois", "nowhere", "--output", str(tmp_path / "bad")) == 2
    assert "--rois" in capsys.readouterr().err
    (root / "test.txt").unlink()
    assert grounding("--split", "test", "--output", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert f"split file not found: {root / 'test.txt'}" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()


def test_flickr30k_cases_score_the_head_that_attends_from_each_phrase_s_last_piece(trained_run, tmp_path,
                                                                                    monkeypatch):
    """Each phrase's word pieces are found in the caption the model read (a repeated word and a word of
    several pieces included): a head attending to the right region from each phrase's last piece only
    scores 1.0; the baseline takes the store's detector scores."""
    from e2e_vl.visualize import grounding
    from e2e_vl.visualize.attention import TextLayout
    from e2e_vl.visualize.run_model import load_run

    sentences = {**FLICKR_SENTENCES, "1002": [
        "A mat lies under [/EN#7/animals two dachshunds] on [/EN#8/other the mat] .",
        "[/EN#9/bodyparts Their tails] are hidden by [/EN#7/animals the dogs] ."]}
    root = write_flickr30k(tmp_path / "flickr30k", sentences, scores=True)
    # attention columns: 0 the whole image, then the store's boxes: 1 chain 7's union, 2 a part of it (right
    # for no phrase), 3 the mat. Per caption: the position of each phrase's last word piece -> its column.
    # [CLS] a mat lies under two da ##chs ##hun ##ds on the mat . / [CLS] their tails are hidden by the dogs .
    right = {"a mat lies under two dachshunds on the mat .": {9: 1, 12: 3},
             "their tails are hidden by the dogs .": {7: 1}}
    real_explain = grounding.explain

    def explain(model, image, boxes, text, **kwargs):
        out = real_explain(model, image, boxes, text, **kwargs)
        att = np.zeros((2, len(out.tokens), len(boxes) + 1))
        att[:, :, 2] = 1.0  # every word of both heads looks at the part ...
        for position, column in right[text.lower()].items():
            att[0, position] = np.eye(len(boxes) + 1)[column]  # ... but head 0 from each phrase's last piece
        out.attention = {"layer0": att}
        return out

    monkeypatch.setattr(grounding, "explain", explain)
    _, model, _ = load_run(trained_run)
    cases = grounding.flickr30k_cases(model, (64, 64), root, "val", 0, TextLayout(80), rois="rois")
    assert [[positions for positions, _ in case.entities] for case in cases] == [
        [[5, 6, 7, 8, 9], [11, 12]], [[6, 7]]]
    np.testing.assert_array_equal(cases[0].entities[0][1], [[0, 0, 40, 20]])  # the union of chain 7's boxes
    table = grounding_table(cases)
    assert table.num_entities == 3
    np.testing.assert_array_equal(table.accuracy["layer0"], [1.0, 0.0])
    assert table.baseline == pytest.approx(2 / 3)  # the store's best-scored box, chain 7's union: not the mat


# -- item 5: training curve ------------------------------------------------------------------------------
def test_a_run_ends_with_its_training_curve_and_plot_run_redraws_it(trained_run, tmp_path, capsys):
    curve = trained_run / "training_curve.png"
    assert curve.is_file()  # written when the run ended
    first = Image.open(curve).convert("RGB")
    assert first.height == 3 * 300  # loss, accuracy, learning-rate panels
    for panel in range(3):  # each panel draws its series inside its axes (the legend is below them)
        plot_area = first.crop((57, panel * 300 + 23, first.width - 9, (panel + 1) * 300 - 55))
        assert sum(colour_pixels(plot_area, c) for c in PALETTE[:4]) > 10, panel
    curve.unlink()
    assert plot_run.main([str(trained_run)]) == 0
    assert curve.is_file() and capsys.readouterr().out.strip() == str(curve)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\nnot json\n')
    assert plot_run.main([str(bad)]) == 2
    assert "metrics.jsonl line 2: not JSON" in capsys.readouterr().err
    assert not (bad / "training_curve.png").exists()


def test_a_run_loads_from_any_directory_after_its_start_files_moved(trained_run, tmp_path, monkeypatch):
    """A run's config names its detector start (MODEL.WEIGHTS) relative to where it was trained; the run's
    own checkpoint replaces it, so loading the run for pictures or the page must not look for it."""
    import shutil

    import yaml

    from e2e_vl.visualize.run_model import load_run

    run = tmp_path / "moved"
    shutil.copytree(trained_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["MODEL"]["WEIGHTS"] = "output/easy_vqa/detector.pth"  # as `make demo`'s run records it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # no output/ here
    _, model, weights = load_run(run)
    assert weights == str(run / "model_best.pth")
    best = torch.load(run / "model_best.pth", weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items() if k in best)
