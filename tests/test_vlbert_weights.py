"""Starting from VL-BERT's released weights and from our own checkpoints (MODEL.INIT_FROM).

`vlbert_keys` writes VL-BERT's checkpoint layout (key -> shape) for any size, following its module tree
(torchvision ResNet names in `image_feature_extractor`, res5 stored twice, 1 x hidden embedding tables, the
heads of each task). At the real base/large sizes it must reproduce the key lists in `tests/data/vlbert/`,
which were taken from VL-BERT's own modules (see the README there); at a tiny size it gives the files the
other tests load. `reference_forward` computes VL-BERT's embedding, encoder and heads by hand from the
file's tensors, under VL-BERT's names, so the loaded model must give the outputs of those weights.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from detector.checkpoint import CheckpointError
from e2e_vl.config import get_train_cfg
from e2e_vl.data.collate import collate_samples
from e2e_vl.engine.trainer import TrainTask, train
from e2e_vl.modeling.vlbert import VLBert
from e2e_vl.modeling.init_from import init_model_weights
from tiny import NUM_CLASSES, image_sample, tiny_detector_cfg, tiny_model

DATA = Path(__file__).parent / "data" / "vlbert"


# ---------------------------------------------------------------------------------------------------------
# VL-BERT's layout, generated
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes and variant of a VL-BERT checkpoint (task: pretrain | vqa | refcoco | vcr; e2e: with the CNN)."""

    task: str = "pretrain"
    e2e: bool = True
    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    vocab: int = 30522
    max_pos: int = 512
    stem: int = 64
    planes: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck widths of res2..res5 (expansion 4)
    blocks: tuple[int, ...] = (3, 4, 23, 3)
    mvrc_classes: int = 1601
    answers: int = 3129


BASE = Layout()
LARGE = Layout(hidden=1024, layers=24, intermediate=4096)
# The tiny model of test_vlbert: ResNet-50 blocks of narrow widths, a 2-layer BERT of 32 hidden.
TINY = Layout(hidden=32, layers=2, intermediate=64, max_pos=64, stem=16, planes=(8, 16, 32, 64),
              blocks=(3, 4, 6, 3), mvrc_classes=NUM_CLASSES, answers=5)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def _stage(prefix: str, inplanes: int, planes: int, blocks: int, stride: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for i in range(blocks):
        cin, b = inplanes if i == 0 else planes * 4, f"{prefix}.{i}"
        for j, shape in enumerate([(planes, cin, 1, 1), (planes, planes, 3, 3),
                                   (planes * 4, planes, 1, 1)], 1):
            keys[f"{b}.conv{j}.weight"] = shape
            keys |= _bn(f"{b}.bn{j}", shape[0])
        if i == 0 and (cin != planes * 4 or stride != 1):
            keys[f"{b}.downsample.0.weight"] = (planes * 4, cin, 1, 1)
            keys |= _bn(f"{b}.downsample.1", planes * 4)
    return keys


def vlbert_keys(lay: Layout) -> dict[str, tuple[int, ...]]:
    """Every key of a VL-BERT `.model` file's state_dict (with DataParallel's `module.`) and its shape."""
    h, keys = lay.hidden, {}
    fe = "image_feature_extractor."
    appearance = lay.planes[3] * 4
    if lay.e2e:
        keys[fe + "backbone.conv1.weight"] = (lay.stem, 3, 7, 7)
        keys |= _bn(fe + "backbone.bn1", lay.stem)
        inplanes = lay.stem
        for n, (planes, blocks, stride) in enumerate(zip(lay.planes[:3], lay.blocks[:3], (1, 2, 2)), 1):
            keys |= _stage(f"{fe}backbone.layer{n}", inplanes, planes, blocks, stride)
            inplanes = planes * 4
        res5 = _stage(f"{fe}roi_head_feature_extractor", inplanes, lay.planes[3], lay.blocks[3], 1)
        keys |= res5 | {k.replace("roi_head_feature_extractor", "head.0"): v for k, v in res5.items()}
    keys[fe + "obj_downsample.1.weight"], keys[fe + "obj_downsample.1.bias"] = (h, 2 * appearance), (h,)
    keys["object_linguistic_embeddings.weight"] = (1, h)
    vl = "vlbert._module." if lay.task == "vcr" else "vlbert."
    keys |= {vl + "word_embeddings.weight": (lay.vocab, h), vl + "end_embedding.weight": (1, h),
             vl + "position_embeddings.weight": (lay.max_pos, h), vl + "token_type_embeddings.weight": (3, h)}
    for ln in ("embedding_LayerNorm", "visual_ln_text", "visual_ln_object"):
        keys |= {f"{vl}{ln}.weight": (h,), f"{vl}{ln}.bias": (h,)}
    for i in range(lay.layers):
        p = f"{vl}encoder.layer.{i}."
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("intermediate.dense", (lay.intermediate, h)),
                            ("output.dense", (h, lay.intermediate))):
            keys |= {p + name + ".weight": shape, p + name + ".bias": (shape[0],)}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            keys |= {f"{p}{ln}.weight": (h,), f"{p}{ln}.bias": (h,)}
    if lay.task == "pretrain":
        keys |= {"object_mask_word_embedding.weight": (1, h), "aux_text_visual_embedding.weight": (1, h)}
        if not lay.e2e:
            keys["object_mask_visual_embedding.weight"] = (1, appearance)
        m = vl + "mlm_head.predictions."
        keys |= {m + "bias": (lay.vocab,), m + "transform.dense.weight": (h, h),
                 m + "transform.dense.bias": (h,), m + "transform.LayerNorm.weight": (h,),
                 m + "transform.LayerNorm.bias": (h,), m + "decoder.weight": (lay.vocab, h)}
        keys |= {vl + "mvrc_head.transform.dense.weight": (h, h), vl + "mvrc_head.transform.dense.bias": (h,),
                 vl + "mvrc_head.region_cls_pred.weight": (lay.mvrc_classes, h),
                 vl + "mvrc_head.region_cls_pred.bias": (lay.mvrc_classes,)}
    elif lay.task == "vqa":  # CLASSIFIER_TYPE mlm: BERT's transform -> Dropout -> Linear
        keys |= {"final_mlp.0.dense.weight": (h, h), "final_mlp.0.dense.bias": (h,),
                 "final_mlp.0.LayerNorm.weight": (h,), "final_mlp.0.LayerNorm.bias": (h,),
                 "final_mlp.2.weight": (lay.answers, h), "final_mlp.2.bias": (lay.answers,)}
    elif lay.task == "refcoco":  # Linear -> GELU -> Dropout -> Linear(h, 1)
        keys |= {"final_mlp.0.dense.weight": (h, h), "final_mlp.0.dense.bias": (h,),
                 "final_mlp.2.weight": (1, h), "final_mlp.2.bias": (1,)}
    elif lay.task == "vcr":  # pooled [CLS] -> Dropout -> Linear(h, 1); the CNN regulariser on region outputs
        keys |= {vl + "pooler.dense.weight": (h, h), vl + "pooler.dense.bias": (h,),
                 "cnn_loss_reg.0.dense.weight": (h, h), "cnn_loss_reg.0.dense.bias": (h,),
                 "cnn_loss_reg.2.weight": (81, h), "cnn_loss_reg.2.bias": (81,),
                 "final_mlp.1.weight": (1, h), "final_mlp.1.bias": (1,)}
    return {"module." + k: v for k, v in keys.items()}


def known_weights(lay: Layout, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in VL-BERT's layout, with its ties (res5's second name, the MLM decoder) kept."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in vlbert_keys(lay).items():
        if not shape:
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif "LayerNorm.weight" in key or "visual_ln" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.2 * torch.randn(shape, generator=g)
    for key in sd:
        if ".head.0." in key:
            sd[key] = sd[key.replace(".head.0.", ".roi_head_feature_extractor.")]
        if key.endswith("mlm_head.predictions.decoder.weight"):
            sd[key] = sd[key.replace("mlm_head.predictions.decoder", "word_embeddings")]
    return sd


def save_vlbert_file(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """As VL-BERT's Checkpoint callback writes it (torch of its time: the legacy, non-zip format)."""
    torch.save({"state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-7, "params": [0, 1]}]},
                "validation_monitor": {"best_epoch": 3, "best_val": 0.71}}, path,
               _use_new_zipfile_serialization=False)
    return path


def _read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split()
        out[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return out


@pytest.mark.parametrize("name, layout", [
    ("pretrain_base_e2e", BASE), ("pretrain_base_prec", dataclasses.replace(BASE, e2e=False)),
    ("pretrain_large_e2e", LARGE), ("vqa_base", dataclasses.replace(BASE, task="vqa", e2e=False)),
    ("refcoco_base", dataclasses.replace(BASE, task="refcoco")),
    ("vcr_base_q2a", dataclasses.replace(BASE, task="vcr")),
])
def test_generated_layout_is_vlbert_own_key_list(name, layout):
    assert vlbert_keys(layout) == _read_key_list(f"{name}.keys.txt")


# ---------------------------------------------------------------------------------------------------------
# VL-BERT's forward, by hand, from the file's tensors
# ---------------------------------------------------------------------------------------------------------
def _ln(x: torch.Tensor, t: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], eps=1e-12)


def _lin(x: torch.Tensor, t: dict, name: str) -> torch.Tensor:
    return x @ t[name + ".weight"].T + t[name + ".bias"]


def reference_forward(t: dict, ids: torch.Tensor, types: torch.Tensor, appearance: torch.Tensor,
                      boxes: torch.Tensor, image_wh: tuple[float, float], num_heads: int) -> torch.Tensor:
    """Final hidden states `[T + K + 1, h]` of one sample, `[CLS] text [SEP] RoI_0..RoI_K-1 [END]`."""
    w, h = image_wh
    size = boxes[:, 2:] - boxes[:, :2]
    pos = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                       size[:, 0] / w, size[:, 1] / h], 1) * 100
    nf = appearance.shape[1] // 8
    freq = pos[:, :, None] / 1000 ** (torch.arange(nf) / nf)
    geometry = torch.cat([freq.sin(), freq.cos()], -1).reshape(len(boxes), -1)
    obj = F.relu(_lin(torch.cat([geometry, appearance], 1), t, "image_feature_extractor.obj_downsample.1"))
    text = t["vlbert.word_embeddings.weight"][ids] + _ln(obj[0], t, "vlbert.visual_ln_text")
    regions = t["object_linguistic_embeddings.weight"][0] + _ln(obj, t, "vlbert.visual_ln_object")
    x = torch.cat([text, regions, t["vlbert.end_embedding.weight"]])
    n_text, n_reg = len(ids), len(boxes)
    positions = torch.tensor(list(range(n_text)) + [n_text] * n_reg + [n_text + 1])
    segments = torch.cat([types, torch.full((n_reg + 1,), 2)])
    x = (x + t["vlbert.position_embeddings.weight"][positions]
         + t["vlbert.token_type_embeddings.weight"][segments])
    x = _ln(x, t, "vlbert.embedding_LayerNorm")
    layer = 0
    while f"vlbert.encoder.layer.{layer}.output.dense.weight" in t:
        p = f"vlbert.encoder.layer.{layer}."
        q, k, v = (_lin(x, t, p + "attention.self." + n).view(len(x), num_heads, -1).transpose(0, 1)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        ctx = (att @ v).transpose(0, 1).reshape(len(x), -1)
        x = _ln(x + _lin(ctx, t, p + "attention.output.dense"), t, p + "attention.output.LayerNorm")
        ffn = _lin(F.gelu(_lin(x, t, p + "intermediate.dense")), t, p + "output.dense")
        x = _ln(x + ffn, t, p + "output.LayerNorm")
        layer += 1
    return x


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):].replace("vlbert._module.", "vlbert."): v for k, v in sd.items()}


def _sample_batch(**extra):
    sample = image_sample(num_boxes=3, text_len=6, seed=3, token_type_ids=torch.tensor([0, 0, 0, 0, 1, 1]),
                          **extra)
    return collate_samples([sample])


def _appearance(model, batch) -> torch.Tensor:
    with torch.no_grad():
        res4 = model.detector.features(model.backbone_input(batch))
        return model.detector.region_outputs(res4, [batch["boxes"][0].float()], scores=False)["features"]


def _reference(model, batch, t) -> torch.Tensor:
    sizes = batch["image_sizes"][0].float()
    with torch.no_grad():
        return reference_forward(t, batch["input_ids"][0], batch["token_type_ids"][0],
                                 _appearance(model, batch), batch["boxes"][0].float(), (sizes[1], sizes[0]),
                                 model.bert.config.num_attention_heads)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def test_pretrained_file_loads_everything_and_gives_the_outputs_of_its_weights(tmp_path):
    sd = known_weights(TINY)
    path = save_vlbert_file(tmp_path / "vl-bert-tiny-e2e.model", sd)
    model = tiny_model(heads=("mlm", "mrc")).eval()
    report = init_model_weights(model, path)

    # Nothing of theirs is left over but step counters and the second names of tied tensors.
    assert set(report.unused) == {"BatchNorm step counters (FrozenBN keeps none)",
                                  "res5 stored a second time (VL-BERT's head = Sequential(res5, pool))",
                                  "MLM decoder, tied to the word embeddings"}
    assert sum(map(len, report.unused.values())) + len(report.loaded) == len(sd)
    # Nothing of ours is left at its initial value but the detector's box predictor (no VL loss uses it).
    assert list(report.fresh) == ["detector parts VL training does not use (RPN, box predictor, attributes)"]
    assert all(".box_predictor." in k for k in report.fresh[next(iter(report.fresh))])

    t, own = _strip(sd), model.state_dict()
    fe, res5 = "image_feature_extractor.", "image_feature_extractor.roi_head_feature_extractor."
    renamed = {"detector.backbone.stem.conv1.norm.running_var": fe + "backbone.bn1.running_var",
               "detector.backbone.res4.0.shortcut.norm.bias": fe + "backbone.layer3.0.downsample.1.bias",
               "detector.roi_heads.res5.2.conv3.norm.weight": res5 + "2.bn3.weight",
               "detector.roi_heads.res5.0.shortcut.weight": res5 + "0.downsample.0.weight",
               "bert.encoder.layer.1.attention.self.key.bias":
                   "vlbert.encoder.layer.1.attention.self.key.bias"}
    for ours, theirs in renamed.items():
        assert torch.equal(own[ours], t[theirs]), ours
    for ours, theirs in {"img_token": "object_linguistic_embeddings.weight",
                         "end_token": "vlbert.end_embedding.weight",
                         "masked_region_token": "object_mask_word_embedding.weight",
                         "text_only_visual": "aux_text_visual_embedding.weight"}.items():
        assert torch.equal(own[ours], t[theirs][0]), ours

    # The stem and the first res2 block, by hand from torchvision-named tensors (BN in eval mode).
    def bn(x, name):
        return F.batch_norm(x, t[name + ".running_mean"], t[name + ".running_var"], t[name + ".weight"],
                            t[name + ".bias"], False, 0.0, 1e-5)

    image = torch.randn(1, 3, 32, 40)
    b = "image_feature_extractor.backbone."
    stem = F.max_pool2d(F.relu(bn(F.conv2d(image, t[b + "conv1.weight"], stride=2, padding=3), b + "bn1")),
                        3, 2, 1)
    block = b + "layer1.0."
    out = F.relu(bn(F.conv2d(stem, t[block + "conv1.weight"]), block + "bn1"))
    out = F.relu(bn(F.conv2d(out, t[block + "conv2.weight"], padding=1), block + "bn2"))
    out = bn(F.conv2d(out, t[block + "conv3.weight"]), block + "bn3")
    out = F.relu(out + bn(F.conv2d(stem, t[block + "downsample.0.weight"]), block + "downsample.1"))
    with torch.no_grad():
        ours_stem = model.detector.backbone.stem(image)
        torch.testing.assert_close(ours_stem, stem, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.detector.backbone.res2[0](ours_stem), out, rtol=1e-4, atol=1e-4)

    # The whole VL side: masked-word logits of every text token and region-class logits of every region.
    batch = _sample_batch(mlm_labels=torch.arange(6), region_labelled=torch.ones(3, dtype=torch.bool),
                          mrc_targets=torch.full((3, NUM_CLASSES), 1.0 / NUM_CLASSES))
    with torch.no_grad():
        out = model(batch)
    hidden = _reference(model, batch, t)
    m = "vlbert.mlm_head.predictions."
    mlm = _ln(F.gelu(_lin(hidden[:6], t, m + "transform.dense")), t, m + "transform.LayerNorm")
    mlm = mlm @ t["vlbert.word_embeddings.weight"].T + t[m + "bias"]
    torch.testing.assert_close(out["mlm_logits"], mlm, rtol=1e-4, atol=1e-4)
    mrc = _lin(F.gelu(_lin(hidden[6:9], t, "vlbert.mvrc_head.transform.dense")), t,
               "vlbert.mvrc_head.region_cls_pred")
    # VL-BERT's region classes come in the Caffe detector's order (background first); ours end with it.
    torch.testing.assert_close(out["mrc_logits"], torch.cat([mrc[:, 1:], mrc[:, :1]], 1), rtol=1e-4,
                               atol=1e-4)


def test_fine_tuned_vqa_file_of_the_precomputed_variant_needs_the_detector_and_gives_its_answers(tmp_path):
    lay = dataclasses.replace(TINY, task="vqa", e2e=False)
    sd = known_weights(lay, seed=1)
    path = save_vlbert_file(tmp_path / "vl-bert-tiny-vqa.model", sd)
    with pytest.raises(CheckpointError, match="no detector weights .* set MODEL.WEIGHTS"):
        init_model_weights(tiny_model(heads=("vqa",)), path)
    model = tiny_model(heads=("vqa",)).eval()
    detector_before = {k: v.clone() for k, v in model.detector.state_dict().items()}
    report = init_model_weights(model, path, detector_loaded=True)
    assert all(torch.equal(v, model.detector.state_dict()[k]) for k, v in detector_before.items())
    assert set(report.fresh) == {"detector trunk and res5 from MODEL.WEIGHTS (the file has none)",
                                 "detector parts VL training does not use (RPN, box predictor, attributes)",
                                 "text-only visual vector (VL-BERT's aux_text_visual_embedding; text-only "
                                 "MLM only)", "masked-region token (pre-training only)"}
    assert not report.unused

    batch = _sample_batch(answer_pos=torch.tensor(5))
    with torch.no_grad():
        logits = model(batch)["vqa_logits"]
    t = _strip(sd)
    hidden = _reference(model, batch, t)[5]
    expected = _lin(_ln(F.gelu(_lin(hidden, t, "final_mlp.0.dense")), t, "final_mlp.0.LayerNorm"), t,
                    "final_mlp.2")
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def test_other_tasks_heads_are_dropped_with_a_report_and_the_vqa_head_starts_from_the_mlm_transform(tmp_path):
    sd = known_weights(TINY)
    report = init_model_weights(model := tiny_model(heads=("vqa",)),
                                 save_vlbert_file(tmp_path / "pre.model", sd))
    assert sorted(report.unused["head 'mlm' is not in this model (MODEL.VL.HEADS)"]) == sorted(
        k[len("module."):] for k in sd if ".mlm_head.predictions." in k and "decoder" not in k)
    assert len(report.unused["head 'mrc' is not in this model (MODEL.VL.HEADS)"]) == 4
    t = _strip(sd)
    assert torch.equal(model.heads["vqa"].transform.dense.weight,
                       t["vlbert.mlm_head.predictions.transform.dense.weight"])
    fresh = report.fresh["new 'vqa' head (its transform.* from the 'mlm' head, VL-BERT's recipe)"]
    assert fresh == ["heads.vqa.classifier.weight", "heads.vqa.classifier.bias"]

    assert not report.notes

    # VCR's file (its transformer in a TimeDistributed wrapper): its heads are not this model's, so reported.
    vcr = known_weights(dataclasses.replace(TINY, task="vcr"))
    model = tiny_model(heads=("vqa",))
    model.detector.backbone.stem.caffe_maxpool = True
    report = init_model_weights(model, save_vlbert_file(tmp_path / "vcr.model", vcr))
    assert any("MODEL.CAFFE_MAXPOOL false" in note for note in report.notes)
    assert sorted(report.unused["head 'vcr' is not in this model (MODEL.VL.HEADS)"]) == [
        "final_mlp.1.bias", "final_mlp.1.weight", "vlbert.pooler.dense.bias", "vlbert.pooler.dense.weight"]
    assert len(report.unused["head 'vcr_objects' is not in this model (MODEL.VL.HEADS)"]) == 4


@pytest.mark.parametrize("task, expected", [
    ("refcoco", {"heads.ref.dense.weight": "final_mlp.0.dense.weight",
                 "heads.ref.classifier.bias": "final_mlp.2.bias"}),
    ("vcr", {"heads.vcr.pooler.dense.weight": "vlbert.pooler.dense.weight",
             "heads.vcr.classifier.weight": "final_mlp.1.weight",
             "heads.vcr_objects.dense.bias": "cnn_loss_reg.0.dense.bias",
             "heads.vcr_objects.classifier.weight": "cnn_loss_reg.2.weight",
             "bert.encoder.layer.1.output.dense.bias": "vlbert.encoder.layer.1.output.dense.bias"}),
    ("vqa", {"heads.vqa.transform.LayerNorm.weight": "final_mlp.0.LayerNorm.weight",
             "heads.vqa.classifier.weight": "final_mlp.2.weight"}),
])
def test_fine_tuned_heads_are_renamed_onto_ours(task, expected):
    from e2e_vl.modeling.vlbert_weights import convert_vlbert_state_dict

    sd = known_weights(dataclasses.replace(TINY, task=task))
    ours, origin, unused = convert_vlbert_state_dict(sd)
    t = _strip(sd)
    assert {k: origin[k] for k in expected} == expected
    assert all(torch.equal(ours[k], t[v]) for k, v in expected.items())
    assert set(unused) == {"BatchNorm step counters (FrozenBN keeps none)",
                           "res5 stored a second time (VL-BERT's head = Sequential(res5, pool))"}
    assert not [k for k in ours if k.startswith("heads.") and not k.startswith(f"heads.{task[:3]}")]


def _edited(tmp_path: Path, edit, lay: Layout = TINY) -> Path:
    sd = known_weights(lay)
    edit(sd)
    return save_vlbert_file(tmp_path / "edited.model", sd)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("module.vlbert.encoder.layer.1.output.dense.weight"),
     r"missing from the file \(1\):\n    bert\.encoder\.layer\.1\.output\.dense\.weight"),
    (lambda sd: sd.update({"module.vlbert.visual_ln_object.weight": torch.ones(31)}),
     r"visual_norms\.region\.weight \(file: vlbert\.visual_ln_object\.weight\): file \(31,\) vs model "
     r"\(32,\)"),
    (lambda sd: sd.update({f"module.image_feature_extractor.{name}.1.conv2.weight": torch.ones(64, 64, 1, 1)
                           for name in ("roi_head_feature_extractor", "head.0")}),
     r"detector\.roi_heads\.res5\.1\.conv2\.weight \(file: "
     r"image_feature_extractor\.roi_head_feature_extractor\.1\."
     r"conv2\.weight\): file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"),
    (lambda sd: sd.update({"module.vlbert.adapter.weight": torch.ones(2)}),
     r"fit no name .*\n    vlbert\.adapter\.weight \(2,\)"),
    (lambda sd: sd.update({"module.vlbert.visual_1x1_text.weight": torch.ones(32, 32)}),
     "visual_size != hidden_size"),
    (lambda sd: sd.update(
        {"module.image_feature_extractor.head.0.0.conv1.weight": torch.zeros(8, 128, 1, 1)}),
     r"head\.0\.0\.conv1\.weight should repeat "
     r".*roi_head_feature_extractor\.0\.conv1\.weight .* the two differ"),
])
def test_a_file_that_does_not_fit_is_an_error_naming_the_tensor(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        init_model_weights(tiny_model(heads=("mlm", "mrc")), _edited(tmp_path, edit))


def test_a_bert_of_another_size_is_named_with_the_fix(tmp_path):
    path = save_vlbert_file(tmp_path / "deep.model", known_weights(dataclasses.replace(TINY, layers=3)))
    with pytest.raises(CheckpointError,
                       match=r"a BERT of 3 layers x 32 hidden, the model's is 2 x 32; set "
                             r"MODEL.VL.BERT_PATH"):
        init_model_weights(tiny_model(heads=("mlm", "mrc")), path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_file_that_would_run_code_is_refused_before_anything_runs(tmp_path, writer):
    marker, path = tmp_path / "ran", tmp_path / "evil.model"
    payload = {"state_dict": {"module.vlbert.word_embeddings.weight": _RunsCode(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=str(path)):
        init_model_weights(tiny_model(heads=("vqa",)), path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Through the config: fine-tuning from a VL-BERT file, then from our own checkpoint
# ---------------------------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, bert_folder: str, heads: list[str], init_from: Path, out: str):
    cfg = tiny_detector_cfg(get_train_cfg())
    v = cfg.MODEL.VL
    v.BERT_PATH, v.BERT_RANDOM_INIT, v.HEADS, cfg.MODEL.INIT_FROM = bert_folder, True, heads, str(init_from)
    v.NUM_ANSWERS, v.NUM_MRC_CLASSES = 5, NUM_CLASSES
    cfg.MODEL.DEVICE, cfg.OUTPUT_DIR = "cpu", str(tmp_path / out)
    s = cfg.SOLVER
    s.MAX_ITER, s.IMS_PER_BATCH, s.CHECKPOINT_PERIOD, s.LOG_PERIOD, s.BASE_LR = 2, 2, 2, 1, 1e-3
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.PIN_MEMORY = 0, False
    return cfg


def _train_two_steps(cfg, model, samples) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(cfg, model, TrainTask(train_set=samples, collate_fn=collate_samples), torch.device("cpu"))
    after = model.state_dict()
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(before[key], after[key])
    return before


def test_fine_tuning_starts_from_a_vlbert_file_and_from_our_own_pretraining_checkpoint(tmp_path, bert_folder):
    sd = known_weights(TINY)
    release = save_vlbert_file(tmp_path / "vl-bert-tiny-e2e.model", sd)

    # 1. Pre-training (MLM + masked RoI classification) continued from VL-BERT's file.
    cfg = _cfg(tmp_path, bert_folder, ["mlm", "mrc"], release, "pretrain")
    model = VLBert.build(cfg)
    t = _strip(sd)
    assert torch.equal(model.state_dict()["bert.embeddings.word_embeddings.weight"],
                       t["vlbert.word_embeddings.weight"])
    targets = torch.softmax(torch.randn(3, NUM_CLASSES), -1)
    pretrain = [image_sample(seed=i, mlm_labels=torch.tensor([-100, 8, -100, 9, -100, -100]),
                             region_labelled=torch.tensor([False, True, True]), mrc_targets=targets)
                for i in range(4)]
    before = _train_two_steps(cfg, model, pretrain)
    assert torch.equal(before["heads.mrc.classifier.weight"][-1],
                       t["vlbert.mvrc_head.region_cls_pred.weight"][0])
    own = tmp_path / "pretrain" / "model_0000002.pth"
    assert own.exists()

    # 2. VQA fine-tuning from our own checkpoint: everything but the heads carried over, the VQA head new
    # (its transform from the MLM head's), the pre-training heads dropped with a report.
    cfg = _cfg(tmp_path, bert_folder, ["vqa"], own, "vqa")
    model = VLBert.build(cfg)
    saved = torch.load(own, weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("heads."))
    assert torch.equal(state["heads.vqa.transform.LayerNorm.bias"],
                       saved["heads.mlm.transform.LayerNorm.bias"])
    vqa = [image_sample(seed=i, answer_pos=3, vqa_targets=torch.rand(5)) for i in range(4)]
    _train_two_steps(cfg, model, vqa)


def test_a_whole_model_checkpoint_given_as_detector_weights_says_to_use_init_from(tmp_path):
    model = tiny_model(heads=("vqa",))
    path = tmp_path / "model_best.pth"
    torch.save({"model": model.state_dict()}, path)
    cfg = tiny_detector_cfg(get_train_cfg())
    cfg.MODEL.WEIGHTS, cfg.MODEL.VL.NUM_ANSWERS = str(path), 5
    with pytest.raises(CheckpointError, match="whole-model training checkpoint .* MODEL.INIT_FROM"):
        VLBert.build(cfg)


def test_eval_only_evaluates_the_model_built_from_init_from(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "tools"))
    import train_net

    from e2e_vl.config import ConfigError

    cfg = get_train_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "empty")
    model = tiny_model(heads=("vqa",))
    with pytest.raises(ConfigError, match="no training checkpoint"):
        train_net._load_eval_weights(cfg, model, "cpu")
    cfg.MODEL.INIT_FROM = str(save_vlbert_file(tmp_path / "vqa.model", known_weights(TINY)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train_net._load_eval_weights(cfg, model, "cpu") == cfg.MODEL.INIT_FROM
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # as VLBert.build left it


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("heads.vqa.classifier.bias"),
     r"missing from the file \(1\):\n    heads\.vqa\.classifier\.bias"),
    (lambda sd: sd.update({"appearance_norm.running_mean": torch.zeros(256)}),
     r"not in the model \(1\):\n    appearance_norm\.running_mean"),
    (lambda sd: sd.update({"heads.vqa.classifier.weight": torch.zeros(7, 32)}),
     r"heads\.vqa\.classifier\.weight: file \(7, 32\) vs model \(5, 32\)"),
])
def test_our_own_checkpoint_is_held_to_the_same_rules(tmp_path, edit, message):
    sd = tiny_model(heads=("vqa",)).state_dict()
    edit(sd)
    torch.save({"model": sd, "step": 3}, tmp_path / "model_best.pth")
    with pytest.raises(CheckpointError, match=message):
        init_model_weights(tiny_model(heads=("vqa",)), tmp_path / "model_best.pth")


def test_init_from_that_does_not_exist_is_a_config_error_before_any_work():
    from e2e_vl.config import ConfigError, load_train_cfg

    with pytest.raises(ConfigError,
                       match="'MODEL.INIT_FROM' nowhere/vl-bert-base-e2e.model does not exist"):
        load_train_cfg(None, ["MODEL.INIT_FROM", "nowhere/vl-bert-base-e2e.model",
                              "MODEL.WEIGHTS", ""])


def test_a_pretraining_run_with_feature_masking_starts_a_model_without_it(tmp_path):
    source = tiny_model(heads=("mlm", "mrc"), masking="feature")
    torch.save({"model": source.state_dict()}, tmp_path / "pretrain.pth")
    report = init_model_weights(tiny_model(heads=("vqa",)), tmp_path / "pretrain.pth")
    assert report.unused["learned feature of masked regions (MASKING feature, pre-training only), "
                         "not in this model"] == ["masked_region_feature"]



def test_fine_tuned_vcr_file_gives_its_choice_scores_and_region_classes(tmp_path):
    sd = known_weights(dataclasses.replace(TINY, task="vcr"))
    model = tiny_model(heads=("vcr", "vcr_objects")).eval()
    report = init_model_weights(model, save_vlbert_file(tmp_path / "vcr.model", sd))
    assert not [reason for reason in report.fresh if "head" in reason]
    batch = _sample_batch(choice_label=0)
    with torch.no_grad():
        out = model(batch)
    t = _strip(sd)
    hidden = _reference(model, batch, t)
    pooled = torch.tanh(_lin(hidden[0], t, "vlbert.pooler.dense"))  # VL-BERT's VCR head reads BERT's pooler
    torch.testing.assert_close(out["vcr_logits"].flatten(), _lin(pooled, t, "final_mlp.1"), rtol=1e-4,
                               atol=1e-4)
    regions = _lin(F.gelu(_lin(hidden[6:9], t, "cnn_loss_reg.0.dense")), t, "cnn_loss_reg.2")
    torch.testing.assert_close(model.heads["vcr_objects"](hidden[6:9]), regions, rtol=1e-4, atol=1e-4)

    assert torch.equal(model.bert.embeddings.token_type_embeddings.weight,
                       t["vlbert.token_type_embeddings.weight"])

    # From the pre-trained file, as VL-BERT's VCR recipe: the regulariser's first Linear is the MVRC head's,
    # and segment B (the answer) starts as segment A.
    pre = _strip(known_weights(TINY))
    model = tiny_model(heads=("vcr", "vcr_objects"))
    init_model_weights(model, save_vlbert_file(tmp_path / "pre.model", known_weights(TINY)))
    assert torch.equal(model.heads["vcr_objects"].dense.bias, pre["vlbert.mvrc_head.transform.dense.bias"])
    rows, file_rows = (model.bert.embeddings.token_type_embeddings.weight,
                       pre["vlbert.token_type_embeddings.weight"])
    assert torch.equal(rows[1], file_rows[0]) and torch.equal(rows[2], file_rows[2])


def test_fine_tuned_refcoco_file_gives_its_region_scores(tmp_path):
    sd = known_weights(dataclasses.replace(TINY, task="refcoco"), seed=2)
    model = tiny_model(heads=("ref",)).eval()
    report = init_model_weights(model, save_vlbert_file(tmp_path / "refcoco.model", sd))
    assert not [reason for reason in report.fresh if "head" in reason] and not report.notes
    batch = _sample_batch()
    with torch.no_grad():
        logits = model(batch)["ref_logits"][0]
    t = _strip(sd)
    hidden = _reference(model, batch, t)[6:9]
    expected = _lin(F.gelu(_lin(hidden, t, "final_mlp.0.dense")), t, "final_mlp.2").squeeze(-1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)

    # From the pre-trained file, as VL-BERT's RefCOCO+ recipe: the scorer's first Linear is the MVRC head's.
    pre = known_weights(TINY)
    model = tiny_model(heads=("ref",))
    report = init_model_weights(model, save_vlbert_file(tmp_path / "pre.model", pre))
    assert torch.equal(model.heads["ref"].dense.weight,
                       _strip(pre)["vlbert.mvrc_head.transform.dense.weight"])
    assert report.fresh["new 'ref' head (its dense.* from the 'mrc' head, VL-BERT's recipe)"] == [
        "heads.ref.classifier.weight", "heads.ref.classifier.bias"]
