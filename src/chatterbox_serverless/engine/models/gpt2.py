"""A GPT-2 decoder (the backbone of Chatterbox Turbo's T3) with the same KV cache as models/llama.py.

Numerically it follows transformers' `GPT2Model` in inference: input embeddings + learned absolute positions
(`wpe`), pre-LayerNorm blocks (`ln_1` -> causal self-attention with biases -> residual, `ln_2` -> MLP with the
tanh GELU ("gelu_new") -> residual), final `ln_f`. Attribute names mirror the checkpoint keys under `tfmr.`:
`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.c_attn`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`, `h.{i}.mlp.c_fc`,
`h.{i}.mlp.c_proj`, `ln_f`. Like transformers' `Conv1D`, the projections store their weight as (in, out) and
compute `x @ W + b`. `wte` is in the official file but unused (T3 feeds embeddings directly).

The forward call is that of `LlamaModel`: every call writes the keys/values of its T new positions into the
cache rows it is given, at each row's own positions (which are also its absolute positions for `wpe`), and
attends causally over what the row holds, so prefill and decoding are one call and rows of different lengths
share a decoding step. Sizes come from the tensors; only the head count (which shapes cannot give) is a
configuration value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .llama import KVCache, decode_attention, prepacking_supported, _version


@dataclass
class GPT2Config:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    vocab_size: int = 50276                    # the unused `wte`
    max_positions: int = 8196                  # `wpe` rows: the longest sequence (conditioning + text + speech)
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def gelu_new(x: Tensor) -> Tensor:
    """transformers' "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as it does."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1D(nn.Module):
    """GPT-2's projection: weight (in, out), y = x @ W + b (keys `weight`, `bias`).

    With `prepack` on (CPU; see LlamaModel's `Linears`), the weight is reordered once into oneDNN's blocked layout
    and products with more than a few rows (prefill, batched decoding) go through oneDNN; the packed copy costs as
    much memory as the weight and is rebuilt when the weight changes."""
    prepack: bool = False

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)          # as transformers' Conv1D (the checkpoint replaces it)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        shape = (*x.shape[:-1], w.shape[1])
        x2 = x.reshape(-1, x.shape[-1])
        if (not self.prepack or x.device.type != "cpu" or torch.compiler.is_compiling()
                or (w.dtype == torch.float32 and x2.shape[0] <= 4)):
            return torch.addmm(self.bias, x2, w).view(shape)      # what transformers' Conv1D computes
        key = (w.data_ptr(), _version(w), w.dtype, tuple(w.shape))
        entry = self.__dict__.get("_pack")
        if entry is None or entry[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                entry = self.__dict__["_pack"] = (key, torch.ops.mkldnn._reorder_linear_weight(
                    w.detach().t().contiguous(), 16))
        return torch.ops.mkldnn._linear_pointwise(x2, entry[1], self.bias, "none", [], "").view(shape)


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, rows: slice, where: tuple[Tensor, Tensor],
                mask: Tensor) -> Tensor:
        """x (R, T, C); where = (cache rows, positions), both (R, T); mask (R, 1, T, K) additive over the first K
        cache positions of each row."""
        R, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self.c_attn(x).view(R, T, 3, H, D)
        q = qkv[:, :, 0]
        row_ids, positions = where
        k_cache[row_ids, :, positions] = qkv[:, :, 1]
        v_cache[row_ids, :, positions] = qkv[:, :, 2]
        K = mask.shape[-1]
        keys, values = k_cache[rows, :, :K], v_cache[rows, :, :K]
        if T == 1 and torch.compiler.is_compiling() and x.device.type == "cpu":
            out = decode_attention(q.transpose(1, 2), keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(R, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, rows: slice, where: tuple[Tensor, Tensor],
                mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), k_cache, v_cache, rows, where, mask)
        return x + self.mlp(self.ln_2(x))


class _LayerStack(nn.Module):
    """`GPT2Model._run_layers` as a module of its own (what torch.compile freezes), outside the state dict."""

    def __init__(self, model: "GPT2Model"):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model._run_layers(*args)


class GPT2Model(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._compiled_layers = None

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def set_prepacked_weights(self, enabled: bool) -> bool:
        """Use oneDNN prepacked weights for the projections (see `Conv1D`) where supported. Returns whether on."""
        p = self.ln_f.weight
        on = bool(enabled) and prepacking_supported(p.device, p.dtype)
        for m in self.modules():
            if isinstance(m, Conv1D):
                m.prepack = on
                m.__dict__.pop("_pack", None)
        return on

    def compile_decoding(self) -> None:
        """Decoding steps (T = 1, at least two rows) through torch.compile from now on (see
        LlamaModel.compile_decoding: the same settings and caveats)."""
        if self.ln_f.weight.device.type == "cpu":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
        import torch.fx.experimental._config as fx_config
        fx_config.use_duck_shape = False
        self.__dict__["_compiled_layers"] = torch.compile(_LayerStack(self), dynamic=True)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        p = self.ln_f.weight
        return KVCache(self.cfg, rows, capacity, device=p.device, dtype=p.dtype)

    def forward(self, x: Tensor, cache: KVCache, rows: slice, start: Tensor | list[int]) -> Tensor:
        """As LlamaModel.forward: x (R, T, C) input embeddings (without positions), start (R,) positions each row
        already holds. Returns the ln_f output (R, T, C)."""
        R, T, _ = x.shape
        if isinstance(start, Tensor):
            K = int(start.max()) + T
        else:
            K = max(start) + T
            start = torch.tensor(start, dtype=torch.long, device=x.device)
        if K > self.cfg.max_positions:
            raise ValueError(f"sequence of {K} positions, the model has {self.cfg.max_positions}")
        positions = start[:, None] + torch.arange(T, device=x.device)[None, :]          # (R, T)
        cache.ensure(rows.stop, K)
        x = x + self.wpe(positions)
        where = (torch.arange(rows.start, rows.stop, device=x.device)[:, None].expand(R, T), positions)
        key_pos = torch.arange(K, device=x.device)
        allowed = (key_pos[None, None, :] <= positions[:, :, None])[:, None]          # (R, 1, T, K)
        mask = torch.zeros(allowed.shape, device=x.device, dtype=x.dtype).masked_fill_(~allowed, float("-inf"))
        run = self._compiled_layers if self._compiled_layers is not None and T == 1 and R > 1 else self._run_layers
        return run(x, cache.k, cache.v, rows.start, rows.stop, where, mask)

    def _run_layers(self, x: Tensor, k_caches: list[Tensor], v_caches: list[Tensor], first_row: int, end_row: int,
                    where: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        rows = slice(first_row, end_row)
        for block, kc, vc in zip(self.h, k_caches, v_caches):
            x = block(x, kc, vc, rows, where, mask)
        return self.ln_f(x)
