"""The perceiver resampler of T3's conditioning: 150 prompt-token embeddings -> 32 latents.

One attention block (a single LayerNorm for queries and keys/values, q/k/v/out Linears with bias, SDPA with the
default scale, residual on the query side) is applied twice: learned queries attend to the prompt, then the
result attends to itself. Keys mirror the checkpoint: `pre_attention_query`, `attn.{norm,to_q,to_k,to_v,proj_out}`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """x1 (B, Lq, C) queries, x2 (B, Lk, C) keys/values -> (B, Lq, C)."""
        q_in, kv_in = self.norm(x1), self.norm(x2)
        q, k, v = self._heads(self.to_q(q_in)), self._heads(self.to_k(kv_in)), self._heads(self.to_v(kv_in))
        h = F.scaled_dot_product_attention(q, k, v)
        B, _, Lq, _ = h.shape
        h = h.transpose(1, 2).reshape(B, Lq, -1)
        return x1 + self.proj_out(h)


class Perceiver(nn.Module):
    def __init__(self, num_queries: int, channels: int, num_heads: int):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.zeros(1, num_queries, channels))
        self.attn = AttentionBlock(channels, num_heads)

    def forward(self, h: Tensor) -> Tensor:
        """h (B, L, C) -> (B, num_queries, C)."""
        query = self.pre_attention_query.expand(h.shape[0], -1, -1)
        latents = self.attn(query, h)
        return self.attn(latents, latents)
