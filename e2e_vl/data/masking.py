"""Masking for VL-BERT pre-training: whole-word MLM masking, region selection and pixel zeroing.

Sample-level decisions (which words, which regions) are drawn in the data loader with an explicit
`random.Random`, so a resumed run can reproduce them; the pixel zeroing itself runs inside the model on
the normalised image tensor (`GeneralizedRCNN.prepare_batch`, with `detector.structures.box_pixel_mask`),
because "zero" must mean the mean colour, i.e. zero *after* normalisation, and the normalisation happens
on the device.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

IGNORE_INDEX = -100


def mask_whole_words(
    input_ids: Sequence[int],
    word_ids: Sequence[int | None],
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    rng: random.Random,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[list[int], list[int]]:
    """Whole-word masking (BERT/VL-BERT): choose each word with `prob`; all its word pieces are labelled.

    A chosen word is replaced by [MASK] with probability `mask_frac`, by random tokens with
    `random_frac`, and kept otherwise (the decision is made once per word, so a word's pieces are treated
    alike). `word_ids[i]` is the word index of token i (as from a fast tokenizer) or None for special
    tokens, which are never chosen. Returns the new ids and the labels (original id where chosen,
    IGNORE_INDEX elsewhere).
    """
    if len(input_ids) != len(word_ids):
        raise ValueError(f"input_ids ({len(input_ids)}) and word_ids ({len(word_ids)}) differ in length")
    special = set(special_ids)
    words: dict[int, list[int]] = {}
    for pos, word in enumerate(word_ids):
        if word is not None and input_ids[pos] not in special:
            words.setdefault(word, []).append(pos)
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    for positions in words.values():
        if rng.random() >= prob:
            continue
        action = rng.random()
        for pos in positions:
            labels[pos] = ids[pos]
            if action < mask_frac:
                ids[pos] = mask_token_id
            elif action < mask_frac + random_frac:
                ids[pos] = _random_token(rng, vocab_size, special)
    return ids, labels


def _random_token(rng: random.Random, vocab_size: int, special: set[int]) -> int:
    while True:
        token = rng.randrange(vocab_size)
        if token not in special:
            return token


def select_masked_regions(
    num_regions: int, *, rng: random.Random, prob: float = 0.15, mask_frac: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked RoI classification: which regions are labelled and which of those are masked.

    Region 0 (the whole image) is never chosen. Each other region is chosen with `prob`; a chosen region
    is masked with probability `mask_frac` (its pixels zeroed) and kept otherwise; every chosen region
    is labelled. Returns two bool tensors `[num_regions]`: labelled, masked.
    """
    labelled = torch.zeros(num_regions, dtype=torch.bool)
    masked = torch.zeros(num_regions, dtype=torch.bool)
    for k in range(1, num_regions):
        if rng.random() < prob:
            labelled[k] = True
            masked[k] = rng.random() < mask_frac
    return labelled, masked
