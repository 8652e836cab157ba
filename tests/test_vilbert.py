"""ViLBERT: two streams with co-attention on the shared detector path, its released checkpoint layout, and
a short easy-VQA fine-tuning run.

Tiny random detector and BERT (the ones of `tiny`) keep every test to CPU seconds. The released
checkpoints are imitated by `released_state`, which lists vilbert-multi-task's tensor names and shapes
(read off its model code: BertModel with embeddings, v_embeddings, encoder.layer / v_layer / c_layer,
t_pooler, v_pooler, and BertPreTrainingHeads as cls) for a tiny configuration.
"""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from detector.checkpoint import CheckpointError
from detector.modeling import build_detector
from e2e_vl.config import ConfigError, get_train_cfg, load_train_cfg
from e2e_vl.data.collate import collate_samples
from e2e_vl.engine.trainer import train
from e2e_vl.modeling import build_model
from e2e_vl.modeling.region_encoder import ModelOptions
from e2e_vl.modeling.vilbert import STREAM_PARTS, ViLBert, ViLBertSizes, box_locations, load_vilbert_weights
from e2e_vl.tasks import get_task
from tiny import NUM_CLASSES, TINY_BERT, capture_backbone_input, image_sample, tiny_detector_cfg

REPO = Path(__file__).resolve().parents[1]
# Text: 3 layers of 32; visual: 2 layers of 24; co-attention 16 wide before text layers 1, 2 and visual 0, 1.
SIZES = ViLBertSizes(v_hidden_size=24, v_num_hidden_layers=2, v_num_attention_heads=2, v_intermediate_size=48,
                     bi_hidden_size=16, bi_num_attention_heads=2, v_biattention_id=(0, 1),
                     t_biattention_id=(1, 2))
TEXT = {**TINY_BERT, "num_hidden_layers": 3}
BERT_FOLDER_LAYERS = 6  # the BERT folder of the config-built models (TEXT is the hand-built ones)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def tiny_vilbert(heads=("mlm", "mrc", "vqa"), **kwargs) -> ViLBert:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TEXT), add_pooling_layer=False)
    options = ModelOptions(heads=heads, num_answers=5, num_mrc_classes=NUM_CLASSES, **kwargs)
    return ViLBert(build_detector(tiny_detector_cfg()), bert, SIZES, options)


def pretraining_sample(**extra) -> dict:
    return image_sample(region_masked=torch.tensor([False, True, False]),
                        region_labelled=torch.tensor([False, True, True]),
                        mrc_targets=torch.softmax(torch.randn(3, NUM_CLASSES), -1),
                        mlm_labels=torch.tensor([-100, 7, -100, 9, -100, -100]), answer_pos=2,
                        vqa_targets=torch.rand(5), **extra)


# ---------------------------------------------------------------------------------------------------
def test_forward_backward_through_the_pixel_masked_detector_updates_it():
    model = tiny_vilbert().train()
    seen = capture_backbone_input(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = model(collate_samples([pretraining_sample(), pretraining_sample(seed=1)]))
    assert set(out["losses"]) == {"mlm", "mrc", "vqa"}
    # Box 1 = [4, 6, 20, 30] is zero in the backbone input, the rest of the image is not.
    assert (seen[0][:, :, 6:30, 4:20] == 0).all() and (seen[0][:, :, 40:, :] != 0).any()
    out["loss"].backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = model.state_dict()
    for trained in ("detector.backbone.res4.", "detector.roi_heads.res5.", "image_embeddings.",
                    "image_layers.", "co_layers.", "bert.encoder.layer.0."):
        keys = [k for k, p in model.named_parameters() if k.startswith(trained)]
        assert keys and all(not torch.equal(before[k], after[k]) for k in keys), trained
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("detector.backbone.stem."))


def test_feature_masking_leaves_the_pixels_and_feeds_the_learned_feature():
    model = tiny_vilbert(masking="feature").eval()
    seen_pixels = capture_backbone_input(model)
    features = []
    model.image_embeddings.register_forward_hook(lambda m, args, out: features.append(args[0]))
    with torch.no_grad():
        model.masked_region_feature.normal_()
    batch = collate_samples([image_sample(region_masked=torch.tensor([False, True, False]), answer_pos=2)])
    model.encode(batch)
    assert torch.equal(seen_pixels[0], model.detector.preprocess_image(batch["images"].float()))
    # Visual tokens: [IMG], then the regions; region 1 is masked.
    assert torch.equal(features[0][0, 2], model.masked_region_feature)
    assert not torch.equal(features[0][0, 1], model.masked_region_feature)


def test_outputs_per_token_per_region_and_pooled():
    model = tiny_vilbert(heads=("mrc", "vqa", "ref")).eval()
    text_only = {"input_ids": torch.arange(5, 9), "answer_pos": 1, "vqa_targets": torch.rand(5)}
    batch = collate_samples([image_sample(num_boxes=3, answer_pos=2, vqa_targets=torch.rand(5)),
                             image_sample(num_boxes=2, seed=1, answer_pos=2, vqa_targets=torch.rand(5)),
                             text_only])
    encoded = model.encode(batch)
    assert encoded.text.shape == (3, 6, 32) and encoded.regions.shape == (3, 3, 24)
    assert encoded.pooled.shape == (3, 16) and (encoded.pooled >= 0).all()  # product of two ReLU poolers
    assert encoded.region_valid.tolist() == [[True] * 3, [True, True, False], [False] * 3]
    assert encoded.has_image.tolist() == [True, True, False]
    out = model(dict(batch, ref_labels=torch.tensor([[0.0, 1.0, -1.0]] * 3)))
    assert out["vqa_logits"].shape == (3, 5) and out["ref_logits"].shape == (3, 3)
    assert set(out["losses"]) == {"vqa", "ref"} and torch.isfinite(out["loss"])


def test_vcr_heads_read_the_text_and_the_visual_stream():
    model = tiny_vilbert(heads=("vcr", "vcr_objects")).train()
    choices = [image_sample(seed=i, object_labels=torch.tensor([0, 5, -1]),
                            **({"choice_label": 1} if i == 0 else {})) for i in range(4)]
    out = model(collate_samples(choices))
    assert out["vcr_logits"].shape == (1, 4) and out["vcr_objects_logits"].shape == (8, 81)
    out["loss"].backward()
    assert model.heads["vcr_objects"].dense.weight.shape == (24, 24)  # the visual stream's width
    assert model.co_layers[1].image.output.dense.weight.grad is not None


def test_box_locations_are_normalised_corners_and_area():
    loc = box_locations(torch.tensor([[10.0, 20.0, 50.0, 80.0]]), torch.tensor([[200.0, 100.0]]))
    torch.testing.assert_close(loc, torch.tensor([[0.05, 0.2, 0.25, 0.8, 0.12]]))


def test_co_attention_mixes_the_streams_only_from_the_first_connection():
    model = tiny_vilbert(heads=("vqa",)).eval()
    seen: dict[str, list] = {}
    for name, module in (("text0", model.bert.encoder.layer[0]), ("image_in", model.image_embeddings),
                         ("co0", model.co_layers[0])):
        module.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, []).append(out))
    base = image_sample(answer_pos=2)
    changed_image = dict(base, image=base["image"].flip(1))
    for sample in (base, changed_image, dict(base, input_ids=base["input_ids"].roll(1))):
        seen.setdefault("text", []).append(model.encode(collate_samples([sample])).text)
    same, other_image, other_text = range(3)
    # Another image: the text stream is unchanged before the first co-attention layer, changed after it.
    assert torch.equal(seen["text0"][same], seen["text0"][other_image])
    assert not torch.allclose(seen["co0"][same][0], seen["co0"][other_image][0])
    assert not torch.allclose(seen["text"][same], seen["text"][other_image])
    # Another text: the visual stream's input is unchanged, its co-attention output is not.
    assert torch.equal(seen["image_in"][same], seen["image_in"][other_text])
    assert not torch.allclose(seen["co0"][same][1], seen["co0"][other_text][1])


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_vilbert(heads=("vqa",)).train()
    model.detector.requires_grad_(False)
    batch = collate_samples([image_sample(answer_pos=2, vqa_targets=torch.rand(5))])
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        model(batch)["loss"].backward()
        grads.append(model.co_layers[0].text.cross.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing


@pytest.mark.parametrize("key, value", [("V_BIATTENTION_ID", [1, 0]), ("T_BIATTENTION_ID", [2, 3]),
                                        ("BI_HIDDEN_SIZE", 15)])
def test_bad_connection_points_or_widths_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"MODEL.VILBERT.{key}"):
        dataclasses.replace(SIZES, **{key.lower(): value}).check(3)


# -- new layers started from the text stream (MODEL.VILBERT.NEW_LAYERS_FROM_TEXT) ----------------------
# The visual stream and co-attention as wide as TEXT, with its heads (2) and feed-forward width.
TEXT_WIDE = ["MODEL.VILBERT.V_HIDDEN_SIZE", "32", "MODEL.VILBERT.V_INTERMEDIATE_SIZE", "64",
             "MODEL.VILBERT.BI_HIDDEN_SIZE", "32"]


def from_text_cfg(bert_folder: str, *overrides: str):
    return tiny_cfg(bert_folder, *TEXT_WIDE, "MODEL.VILBERT.NEW_LAYERS_FROM_TEXT", "True", *overrides)


def test_new_layers_from_text_start_as_copies_of_the_text_layers_at_berts_rate(vilbert_bert_folder):
    random_start = build_model(tiny_cfg(vilbert_bert_folder, *TEXT_WIDE), "vilbert")
    model = build_model(from_text_cfg(vilbert_bert_folder), "vilbert")
    text = model.bert.encoder.layer
    for i, layer in enumerate(model.image_layers):  # visual layer i <- text layer i
        for key, tensor in layer.state_dict().items():
            assert torch.equal(tensor, text[i].state_dict()[key]), (i, key)
    for co_layer, t in zip(model.co_layers, SIZES.t_biattention_id):  # co-attention before text layer t
        source = text[t]
        for block in (co_layer.text, co_layer.image):
            for ours, theirs in ((block.cross.query, source.attention.self.query),
                                 (block.cross.value, source.attention.self.value),
                                 (block.cross_output.LayerNorm, source.attention.output.LayerNorm),
                                 (block.intermediate.dense, source.intermediate.dense),
                                 (block.output.dense, source.output.dense)):
                assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert not torch.equal(random_start.co_layers[0].text.cross.key.weight, text[1].attention.self.key.weight)
    # Copied layers learn at BERT's rate; what is still new (embedding, poolers) at the head's.
    for name in ("co_layers.1.image.cross.query.weight", "image_layers.0.output.dense.weight"):
        assert model.parameter_kind(name) == "bert" and random_start.parameter_kind(name) == "head", name
    assert model.parameter_kind("image_embeddings.features.weight") == "head"
    assert model.parameter_kind("image_pooler.dense.weight") == "head"


@pytest.mark.parametrize("key, value, named", [
    ("V_HIDDEN_SIZE", "24", "'MODEL.VILBERT.V_HIDDEN_SIZE' must be its 32, got 24"),
    ("BI_NUM_ATTENTION_HEADS", "4", "'MODEL.VILBERT.BI_NUM_ATTENTION_HEADS' must be its 2, got 4"),
    ("V_INTERMEDIATE_SIZE", "48", "'MODEL.VILBERT.V_INTERMEDIATE_SIZE' must be its 64, got 48"),
])
def test_new_layers_from_text_refuse_sizes_other_than_the_text_streams(vilbert_bert_folder, key, value,
                                                                       named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_model(from_text_cfg(vilbert_bert_folder, f"MODEL.VILBERT.{key}", value), "vilbert")


def test_new_layers_from_text_and_released_weights_are_one_or_the_other(tmp_path):
    (tmp_path / "vilbert.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="NEW_LAYERS_FROM_TEXT' starts the layers that 'MODEL.VILBERT"):
        load_train_cfg(None, ["MODEL.ARCH", "vilbert", "MODEL.VILBERT.WEIGHTS", str(tmp_path / "vilbert.bin"),
                              "MODEL.VILBERT.NEW_LAYERS_FROM_TEXT", "True"])


# -- released checkpoints ------------------------------------------------------------------------
def released_state(text: dict, sizes: ViLBertSizes, feature_size: int, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Random tensors under vilbert-multi-task's names (BertForMultiModalPreTraining's state dict) for the
    given sizes; the MLM decoder is the word-embedding tensor itself (tied), as there."""
    h, mid, vh, vmid, bi = (text["hidden_size"], text["intermediate_size"], sizes.v_hidden_size,
                            sizes.v_intermediate_size, sizes.bi_hidden_size)
    shapes: dict[str, tuple] = {}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name, n):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (n,)

    def bert_layer(prefix, width, inner):
        for part in ("query", "key", "value"):
            linear(f"{prefix}.attention.self.{part}", width, width)
        linear(f"{prefix}.attention.output.dense", width, width)
        norm(f"{prefix}.attention.output.LayerNorm", width)
        linear(f"{prefix}.intermediate.dense", width, inner)
        linear(f"{prefix}.output.dense", inner, width)
        norm(f"{prefix}.output.LayerNorm", width)

    shapes["bert.embeddings.word_embeddings.weight"] = (text["vocab_size"], h)
    shapes["bert.embeddings.position_embeddings.weight"] = (text["max_position_embeddings"], h)
    shapes["bert.embeddings.token_type_embeddings.weight"] = (2, h)
    norm("bert.embeddings.LayerNorm", h)
    for i in range(text["num_hidden_layers"]):
        bert_layer(f"bert.encoder.layer.{i}", h, mid)
    linear("bert.v_embeddings.image_embeddings", feature_size, vh)
    linear("bert.v_embeddings.image_location_embeddings", 5, vh)
    norm("bert.v_embeddings.LayerNorm", vh)
    for i in range(sizes.v_num_hidden_layers):
        bert_layer(f"bert.encoder.v_layer.{i}", vh, vmid)
    for i in range(len(sizes.v_biattention_id)):
        c = f"bert.encoder.c_layer.{i}"
        for side, width in (("1", vh), ("2", h)):
            for part in ("query", "key", "value"):
                linear(f"{c}.biattention.{part}{side}", width, bi)
            linear(f"{c}.biOutput.dense{side}", bi, width)
            linear(f"{c}.biOutput.q_dense{side}", bi, width)
            norm(f"{c}.biOutput.LayerNorm{side}", width)
        for side, width, inner in (("v", vh, vmid), ("t", h, mid)):
            linear(f"{c}.{side}_intermediate.dense", width, inner)
            linear(f"{c}.{side}_output.dense", inner, width)
            norm(f"{c}.{side}_output.LayerNorm", width)
    linear("bert.t_pooler.dense", h, bi)
    linear("bert.v_pooler.dense", vh, bi)
    linear("cls.predictions.transform.dense", h, h)
    norm("cls.predictions.transform.LayerNorm", h)
    shapes["cls.predictions.bias"] = (text["vocab_size"],)
    linear("cls.bi_seq_relationship", bi, 2)
    linear("cls.imagePredictions.transform.dense", vh, vh)
    norm("cls.imagePredictions.transform.LayerNorm", vh)
    linear("cls.imagePredictions.decoder", vh, 1601)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    return state


@pytest.fixture
def vilbert_bert_folder(tiny_bert_folder) -> str:
    """A Hugging Face BERT folder at toy size (BERT_FOLDER_LAYERS layers of 32) with the real uncased
    vocabulary."""
    return tiny_bert_folder(BERT_FOLDER_LAYERS, pooler=False)


def tiny_cfg(bert_folder: str, *overrides: str):
    """The training config of a tiny ViLBERT (SIZES, the tiny detector) with the given BERT folder."""
    cfg = tiny_detector_cfg(get_train_cfg())
    sizes = [(f"MODEL.VILBERT.{key.upper()}", str(list(value) if isinstance(value, tuple) else value))
             for key, value in dataclasses.asdict(SIZES).items()]
    cfg.merge_from_list(["MODEL.VL.BERT_PATH", bert_folder, "MODEL.VL.HEADS", "['mlm', 'vqa']",
                         "MODEL.VL.NUM_ANSWERS", "5", *[item for pair in sizes for item in pair],
                         *overrides])
    return cfg


def detector_width() -> int:
    return build_detector(tiny_detector_cfg()).roi_heads.out_channels


C0, C1 = "bert.encoder.c_layer.0.", "bert.encoder.c_layer.1."
OURS_AND_RELEASED = [  # by hand from vilbert-multi-task's modules; "1" is its visual side, "2" its text side
    ("bert.encoder.layer.5.output.LayerNorm.weight", "bert.encoder.layer.5.output.LayerNorm.weight"),
    ("image_embeddings.features.weight", "bert.v_embeddings.image_embeddings.weight"),
    ("image_embeddings.location.bias", "bert.v_embeddings.image_location_embeddings.bias"),
    ("image_layers.1.attention.self.value.weight", "bert.encoder.v_layer.1.attention.self.value.weight"),
    ("co_layers.0.text.cross.query.weight", C0 + "biattention.query2.weight"),  # text queries
    ("co_layers.0.text.cross.key.weight", C0 + "biattention.key1.weight"),  # over visual keys
    ("co_layers.1.image.cross.value.bias", C1 + "biattention.value2.bias"),  # and the reverse
    ("co_layers.1.image.cross_output.LayerNorm.weight", C1 + "biOutput.LayerNorm1.weight"),
    ("co_layers.1.text.cross_output.dense.weight", C1 + "biOutput.dense2.weight"),
    ("co_layers.0.text.output.dense.weight", C0 + "t_output.dense.weight"),
    ("co_layers.0.image.intermediate.dense.bias", C0 + "v_intermediate.dense.bias"),
    ("image_pooler.dense.weight", "bert.v_pooler.dense.weight"),
    ("heads.mlm.transform.dense.weight", "cls.predictions.transform.dense.weight"),
    ("heads.mlm.bias", "cls.predictions.bias"),
]


def test_released_checkpoint_layout_loads_into_the_right_places(tmp_path, vilbert_bert_folder, caplog):
    state = released_state({**TEXT, "num_hidden_layers": BERT_FOLDER_LAYERS}, SIZES,
                           feature_size=detector_width())
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg = tiny_cfg(vilbert_bert_folder, "MODEL.VILBERT.WEIGHTS", str(tmp_path / "pytorch_model.bin"))
    model = build_model(cfg, "vilbert")
    ours = model.state_dict()
    for our_key, released in OURS_AND_RELEASED:
        assert torch.equal(ours[our_key], state[released]), our_key
    # Every tensor of the two-stream encoder came from the file.
    for key, tensor in ours.items():
        if key.split(".")[0] in STREAM_PARTS:
            assert any(torch.equal(tensor, t) for t in state.values() if t.shape == tensor.shape), key
    assert model.streams_pretrained and model.parameter_kind("co_layers.0.text.cross.query.weight") == "bert"
    # Reported, not loaded: ViLBERT's unused q_dense layers and the other pre-training heads.
    assert "16 ViLBERT tensors have no place" in caplog.text
    assert C1 + "biOutput.q_dense2.weight" in caplog.text and "cls.bi_seq_relationship.bias" in caplog.text
    out = model(collate_samples([image_sample(answer_pos=2, vqa_targets=torch.rand(5))]))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop(C1 + "biattention.key1.weight"), C1 + "biattention.key1.weight"),
    (lambda s: s.update({"bert.v_embeddings.image_embeddings.weight":
                         torch.zeros(25, s["bert.v_embeddings.image_embeddings.weight"].shape[1])}),
     "bert.v_embeddings.image_embeddings.weight: checkpoint (25, "),
    (lambda s: s.update({"bert.encoder.v_layer.2.output.dense.bias": torch.zeros(24)}),
     "bert.encoder.v_layer.2.output.dense.bias"),
])
def test_missing_misshapen_or_misplaced_released_tensors_are_errors_naming_them(tmp_path, edit, named):
    state = released_state({**TEXT}, SIZES, feature_size=detector_width())
    edit(state)
    torch.save(state, tmp_path / "vilbert.bin")
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_vilbert_weights(tiny_vilbert(), tmp_path / "vilbert.bin")


# -- learning ----------------------------------------------------------------------------------------
def test_short_easy_vqa_finetuning_learns(tmp_path, vilbert_bert_folder):
    """configs/easy_vqa/smoke.yaml with MODEL.ARCH vilbert and a toy BERT, through the shared VQA task,
    training loop and evaluator: the answer loss ends well below its start within 60 steps."""
    cfg = load_train_cfg(REPO / "configs" / "easy_vqa" / "smoke.yaml",
                         ["MODEL.ARCH", "vilbert", "MODEL.VL.BERT_PATH", vilbert_bert_folder,
                          "OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(0)
    model = build_model(cfg, get_task(cfg.TASK).arch(cfg))
    assert isinstance(model, ViLBert)
    metrics = train(cfg, model, get_task(cfg.TASK).build(cfg, model, torch.device("cpu"), False),
                    torch.device("cpu"))
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 60 and 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
