"""Kandinsky 2.0's text head: the layers of the original U-Net checkpoint that turn the two text
encoders' outputs into the U-Net's conditioning (`Text2ImUNet.get_text_emb` in the original repository,
`kandinsky2/model/text2im_model.py`, with `pooling_type="from_model"`, the released configuration).

- cross-attention context: LN1(cat[Linear(XLM-R states), Linear(mT5 states)] along the sequence)
  -> (B, 77 + 77, model_dim); the U-Net attends to all 154 positions, padding included (no mask);
- pooled: LN2(Linear(M-CLIP pooled)) + LN3(AttentionPooling(mT5 states)) -> (B, time_embed_dim),
  added to the U-Net's time embedding (diffusers: `class_embed_type="identity"`, `class_labels`).

Module names are the original's, so the converter copies these keys unchanged.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class AttentionPooling(nn.Module):
    """Unmasked multi-head self-attention over all positions; returns position 0 (the original's
    `AttentionPooling`, same operations in the same order)."""

    def __init__(self, heads: int, in_dim: int, out_dim: int):
        super().__init__()
        self.heads, self.in_dim, self.d_k = heads, in_dim, in_dim // heads
        self.q_linear = nn.Linear(in_dim, in_dim)
        self.v_linear = nn.Linear(in_dim, in_dim)
        self.k_linear = nn.Linear(in_dim, in_dim)
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, x):  # (B, L, in_dim) -> (B, out_dim)
        b = x.shape[0]
        split = lambda t: t.view(b, -1, self.heads, self.d_k).transpose(1, 2)  # noqa: E731 (B, h, L, d_k)
        k, q, v = split(self.k_linear(x)), split(self.q_linear(x)), split(self.v_linear(x))
        scores = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k), dim=-1)
        attended = torch.matmul(scores, v).transpose(1, 2).contiguous().view(b, -1, self.in_dim)
        return self.out(attended)[:, 0]


class Kandinsky20TextHead(ModelMixin, ConfigMixin):
    """(XLM-R states (B, L1, text_dim1), M-CLIP pooled (B, pooled_dim1), mT5 states (B, L2, text_dim2))
    -> (context (B, L1 + L2, model_dim), pooled (B, time_embed_dim))."""

    @register_to_config
    def __init__(self, text_dim1: int = 1024, pooled_dim1: int = 640, text_dim2: int = 512, model_dim: int = 768,
                 time_embed_dim: int = 1536, pooling_heads: int = 8):
        super().__init__()
        self.to_model_dim = nn.Linear(text_dim1, model_dim)
        self.to_model_dim2 = nn.Linear(text_dim2, model_dim)
        self.proj = nn.Linear(pooled_dim1, time_embed_dim)
        self.proj2 = AttentionPooling(pooling_heads, text_dim2, time_embed_dim)
        self.ln_model1 = nn.LayerNorm(model_dim)
        self.ln_model2 = nn.LayerNorm(time_embed_dim)
        self.ln_model3 = nn.LayerNorm(time_embed_dim)

    def forward(self, full1, pooled1, full2):
        pooled = self.ln_model2(self.proj(pooled1))
        pooled = pooled + self.ln_model3(self.proj2(full2))  # the original's in-place `+=`: the same sum
        context = self.ln_model1(torch.cat([self.to_model_dim(full1), self.to_model_dim2(full2)], dim=1))
        return context, pooled
