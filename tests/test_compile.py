"""SOLVER.COMPILE (e2e_vl/engine/compile.py): the detector's trunk and every transformer layer compiled in
place give the loss and gradients of the eager model within float noise, under the same parameter names."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from detector.config import get_cfg
from detector.modeling import build_detector
from e2e_vl.data.collate import collate_samples
from e2e_vl.engine.compile import compile_trunk_and_layers
from e2e_vl.modeling.vlbert import VLBert


def compile_probe() -> str | None:
    """Why torch.compile cannot run on this machine (no C++ compiler, unsupported platform), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as exc:  # noqa: BLE001 - any failure of the tool chain is a reason to skip
        return f"{type(exc).__name__}: {exc}"
    return None


def tiny_vlbert() -> VLBert:
    cfg = get_cfg()
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.RES2_OUT_CHANNELS, r.STEM_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 32, 16, 8
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    return VLBert(build_detector(cfg), bert, heads=["vqa"], num_answers=5, sep_token_id=102,
                  mask_token_id=103)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    samples = []
    for k in (3, 5):
        xy = torch.rand(k, 2, generator=g) * 20
        boxes = torch.cat([torch.tensor([[0.0, 0.0, 48.0, 40.0]]), torch.cat([xy, xy + 12], 1)])
        samples.append({"image": torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8),
                        "boxes": boxes, "input_ids": torch.tensor([101, 7, 8, 102, 103, 102]),
                        "answer_pos": 4, "vqa_targets": torch.tensor([0.0, 1.0, 0.0, 0.3, 0.0])})
    samples.append({"input_ids": torch.tensor([101, 9, 102, 103, 102]), "answer_pos": 3,
                    "vqa_targets": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])})  # text-only
    return collate_samples(samples)


@pytest.mark.slow
def test_compiled_trunk_and_layers_give_the_eager_loss_and_gradients():
    reason = compile_probe()
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    eager = tiny_vlbert().train()
    for m in eager.modules():  # compiled dropout draws other random numbers than eager dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    compiled = copy.deepcopy(eager)
    names = compile_trunk_and_layers(compiled)
    assert names == ["detector.backbone", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are unchanged
    b = batch()
    losses = []
    for model in (eager, compiled):
        loss = model(b)["loss"]
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
