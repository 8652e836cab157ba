"""Inside a training step no device value decides a shape or a branch where the host already knows it
(issue 30: each such read is a host-device sync that stalls the GPU stream). Checked on the CPU with the
meta device, where reading a tensor's value is an error, and against the code it replaced (same values)."""
from __future__ import annotations

import pytest
import torch

from e2e_vl.data.collate import collate_samples
from e2e_vl.modeling.region_encoder import batch_has_images, check_text_region, pad_per_image


def masked_scatter_padding(flat: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What pad_per_image computed before: K_max read from the device, a boolean-mask scatter."""
    k_max = int(counts.max())
    valid = torch.arange(k_max)[None, :] < counts[:, None]
    padded = flat.new_zeros((len(counts), k_max, flat.shape[1]))
    padded[valid] = flat
    return padded, valid


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [2], [0, 4]])
def test_pad_per_image_equals_the_masked_scatter_and_reads_no_device_value(counts):
    flat = torch.randn(sum(counts), 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    padded, valid = pad_per_image(flat, counts)
    ref_padded, ref_valid = masked_scatter_padding(flat, torch.tensor(counts))
    assert torch.equal(padded, ref_padded) and torch.equal(valid, ref_valid) and valid.dtype == torch.bool
    padded.sum().backward()  # gradients reach every real row
    assert torch.equal(flat.grad, torch.ones_like(flat))
    meta, meta_valid = pad_per_image(torch.empty(sum(counts), 6, device="meta"), counts)
    assert meta.shape == ref_padded.shape and meta_valid.shape == ref_valid.shape


def sample(with_image: bool, boxes: int = 3, key: str | None = None) -> dict:
    s = {"input_ids": torch.tensor([101, 7, 102])}
    if with_image:
        s.update(image=torch.zeros(3, 8, 8, dtype=torch.uint8), boxes=torch.rand(boxes, 4), image_key=key)
    return s


@pytest.mark.parametrize("has", [[True, False, True], [False, False], [False, True], [True]])
def test_batch_has_images_agrees_with_the_sample_index_without_reading_it(has):
    batch = collate_samples([sample(h, key=f"img{i // 2}") for i, h in enumerate(has)])
    assert batch_has_images(batch) == bool((batch["sample_image_index"] >= 0).any()) == any(has)
    batch["sample_image_index"] = batch["sample_image_index"].to("meta")  # its values are now unreadable
    assert batch_has_images(batch) == any(has)


def test_text_region_check_reads_the_sample_index_only_for_a_failing_batch():
    batch = collate_samples([sample(True, 2), sample(False), sample(True, 1)])
    index = batch["sample_image_index"]
    batch["sample_image_index"] = index.to("meta")
    check_text_region(batch, 0)  # every image has a region 0: decided from the box lists alone
    batch["sample_image_index"] = index
    with pytest.raises(ValueError, match=r"no region 1 \(regions per sample: \[2, None, 1\]\)"):
        check_text_region(batch, 1)


def test_vqa_loss_of_an_all_question_batch_equals_the_masked_one_and_reads_no_device_value():
    from transformers import BertConfig

    from e2e_vl.modeling.heads import AnswerHead, Encoded, soft_bce_loss

    torch.manual_seed(0)
    config = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16)
    head = AnswerHead(config, 5, torch.nn.Embedding(10, 8), dropout=0.0)
    text = torch.randn(3, 4, 8)
    batch = {"answer_pos": torch.tensor([1, 2, 3]), "vqa_targets": torch.rand(3, 5)}
    encoded = Encoded(text, text[:, :0], torch.zeros(3, 0, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    out = head.outputs(encoded, batch)
    everyone = torch.ones(3, dtype=torch.bool)  # what the loss selected before: every row
    assert torch.equal(out["losses"]["vqa"],
                       soft_bce_loss(out["vqa_logits"][everyone], batch["vqa_targets"][everyone]))
    mixed = head.outputs(encoded, {**batch, "vqa_labelled": torch.tensor([True, False, True])})
    two = [0, 2]
    assert torch.equal(mixed["losses"]["vqa"],
                       soft_bce_loss(out["vqa_logits"][two], batch["vqa_targets"][two]))

    head.to("meta")
    meta = Encoded(text.to("meta"), text[:, :0].to("meta"), encoded.region_valid.to("meta"),
                   encoded.has_image.to("meta"))
    loss = head.outputs(meta, {k: v.to("meta") for k, v in batch.items()})["losses"]["vqa"]
    assert loss.device.type == "meta" and loss.shape == ()
