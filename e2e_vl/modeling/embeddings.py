"""Visual side of the VL-BERT input: box geometry, object features and the visual LayerNorms.

The transformer input of every element is `token embedding + visual feature embedding + segment +
position` (VL-BERT, Su et al. 2020). This module computes the *visual feature embedding* part: the
object feature of each region from its appearance (the detector's 2048-d Res5 feature) and its
geometry (a sinusoidal code of the normalised box), and the LayerNorms that scale it into the word
embedding space. Token, segment and position embeddings are BERT's own and are added by
`transformers.BertModel` (see `e2e_vl.modeling.vlbert`).
"""

from __future__ import annotations

import torch
from torch import nn

GEOMETRY_DIM = 2048
APPEARANCE_DIM = 2048


def box_geometry_embedding(
    boxes: torch.Tensor, image_wh: torch.Tensor, dim: int = GEOMETRY_DIM
) -> torch.Tensor:
    """VL-BERT's sinusoidal geometry code of boxes, `[K, dim]`.

    Each box (x1, y1, x2, y2) becomes (centre x, centre y, width, height) divided by the image's
    (W, H) and multiplied by 100, so the four numbers lie in [0, 100] whatever the image size. Each
    number is divided by `dim // 8` wavelengths `1000 ** (i / (dim // 8))` and its sine and cosine are
    taken: 4 numbers x (sin, cos) x dim/8 frequencies = `dim` features, laid out per number as
    [sin..., cos...].

    `image_wh` is `[K, 2]` (or broadcastable): the size of the image each box lives in, in the same
    (resized) pixel coordinates as the boxes.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if dim % 8:
        raise ValueError(f"geometry dim must be a multiple of 8, got {dim}")
    boxes = boxes.float()
    wh = image_wh.to(boxes).expand(boxes.shape[0], 2)
    size = boxes[:, 2:] - boxes[:, :2]
    centre = boxes[:, :2] + 0.5 * size
    normalised = torch.cat([centre / wh, size / wh], dim=1) * 100.0  # [K, 4]
    num_freq = dim // 8
    wavelengths = 1000.0 ** (torch.arange(num_freq, device=boxes.device, dtype=torch.float32) / num_freq)
    angles = normalised[:, :, None] / wavelengths  # [K, 4, num_freq]
    return torch.cat([angles.sin(), angles.cos()], dim=2).reshape(boxes.shape[0], dim)


class ObjectFeatureEmbedding(nn.Module):
    """Object feature = Dropout(0.1) -> Linear(geometry 2048 + appearance 2048 -> hidden) -> ReLU.

    Geometry comes first in the concatenation, as in VL-BERT. The result is what VL-BERT calls the
    visual feature of a region; the whole-image box's feature is also the visual feature of every
    text token.
    """

    def __init__(
        self,
        hidden_size: int,
        appearance_dim: int = APPEARANCE_DIM,
        geometry_dim: int = GEOMETRY_DIM,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.geometry_dim = geometry_dim
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(geometry_dim + appearance_dim, hidden_size)
        self.act = nn.ReLU()

    def forward(self, appearance: torch.Tensor, boxes: torch.Tensor, image_wh: torch.Tensor) -> torch.Tensor:
        geometry = box_geometry_embedding(boxes, image_wh, self.geometry_dim).to(appearance.dtype)
        return self.act(self.proj(self.dropout(torch.cat([geometry, appearance], dim=1))))


class VisualLayerNorms(nn.Module):
    """The two LayerNorms that put visual features into the word-embedding space.

    One for the visual feature added to text tokens (the whole-image feature, or the learned text-only
    embedding), one for region tokens. Their betas start at 0 and their gammas at `scale_init`: VL-BERT's
    default 0 means that at initialisation the input of a text token is exactly BERT's and the
    pre-trained language model is not disturbed; the visual term is switched on by learning (VL-BERT
    exposes the same choice as visual_scale_text_init / visual_scale_object_init).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-12, scale_init: float = 0.0):
        super().__init__()
        self.text = nn.LayerNorm(hidden_size, eps=eps)
        self.region = nn.LayerNorm(hidden_size, eps=eps)
        for norm in (self.text, self.region):
            nn.init.constant_(norm.weight, scale_init)
            nn.init.zeros_(norm.bias)
