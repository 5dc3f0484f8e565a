"""A Llama decoder (the backbone of T3) with a KV cache whose rows each have their own length.

Numerically it follows transformers' `LlamaModel` (RMSNorm in float32, llama3-scaled RoPE on rotated halves,
SwiGLU MLP, no biases). Attribute names mirror the checkpoint keys under `tfmr.`: `embed_tokens`, `layers.{i}.
self_attn.{q,k,v,o}_proj`, `layers.{i}.mlp.{gate,up,down}_proj`, `layers.{i}.{input,post_attention}_layernorm`,
`norm`. `embed_tokens` is in the official file but unused (T3 feeds embeddings directly).

Every forward call writes the keys/values of its T new positions into the cache rows it is given, at each row's
own positions, and attends causally over what that row holds. Prefill (T = prompt length) and decoding (T = 1)
are the same call, so requests of different lengths share one decoding step.

`LlamaModel.compile_decoding()` (opt-in) runs the decoding step (T = 1, two rows or more) through torch.compile:
one compiled graph for any number of rows and cache length (dynamic shapes), the layers' small operations fused
and, on CPU, the weights frozen and packed by Inductor. The code traced is the code below, not a copy: under
compilation the weight bookkeeping (fusion checks, oneDNN packs) is skipped, `compile_decoding` having fused
the weights beforehand, and on CPU attention over the cache is written as products and sums
(`decode_attention`), which the compiler fuses into single passes over the cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 30
    num_heads: int = 16
    head_dim: int = 64
    vocab_size: int = 8                       # the unused `embed_tokens`
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_factor: float = 8.0                  # llama3 rope scaling
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192


def llama3_inv_freq(cfg: LlamaConfig) -> Tensor:
    """Inverse RoPE frequencies with llama3 scaling (long wavelengths divided by `factor`, a smooth blend between)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (*positions.shape, head_dim), computed in float32 as transformers does."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # one fused op: x * rsqrt(mean(x^2) + eps) * weight, accumulated in float32 (bit-identical to the
        # transformers formula in float32; in bfloat16 it rounds once instead of twice)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache:
    """Pre-allocated keys/values, one tensor pair per layer of shape (rows, heads, capacity, head_dim).

    Rows are cache slots (the decoder maps requests to rows); capacity grows by whole chunks when a longer
    sequence arrives, so appending a token never reallocates in the common case."""

    def __init__(self, cfg: LlamaConfig, rows: int, capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, chunk: int = 256):
        self.cfg, self.device, self.dtype, self.chunk = cfg, torch.device(device), dtype, chunk
        self.rows, self.capacity = 0, 0
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.ensure(rows, capacity)

    def ensure(self, rows: int, capacity: int, max_rows: int | None = None) -> None:
        """Grow (never shrink) to at least `rows` x `capacity` (rows: at most `max_rows`), keeping the contents."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        # grow geometrically (each growth copies the whole cache), capacity in whole chunks
        new_rows = self.rows if rows <= self.rows else max(rows, min(2 * self.rows, max_rows or 2 * self.rows))
        new_cap = self.capacity
        if capacity > self.capacity:
            new_cap = -(-max(capacity, int(1.5 * self.capacity)) // self.chunk) * self.chunk
        shape = (new_rows, self.cfg.num_heads, new_cap, self.cfg.head_dim)
        for store in (self.k, self.v):
            for i in range(self.cfg.num_layers):
                t = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if store and self.rows and self.capacity:
                    t[: self.rows, :, : self.capacity] = store[i]
                if len(store) < self.cfg.num_layers:
                    store.append(t)
                else:
                    store[i] = t
        self.rows, self.capacity = new_rows, new_cap

    def read(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """Copies of the first `length` positions of `row`, per layer."""
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in zip(self.k, self.v)]

    def write(self, row: int, kv: list[tuple[Tensor, Tensor]], length: int | None = None) -> None:
        """Put (the first `length` positions of) what `read` returned at the start of `row`."""
        length = kv[0][0].shape[1] if length is None else length
        self.ensure(row + 1, length)
        for (k, v), kc, vc in zip(kv, self.k, self.v):
            kc[row, :, :length] = k[:, :length]
            vc[row, :, :length] = v[:, :length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (used to keep active rows contiguous)."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]


def fused_weight(modules: list[nn.Linear]) -> Tensor:
    """One weight (sum of out_features, in_features) whose row blocks ARE the given Linears' weights.

    The Linears' parameters are re-pointed to views of the fused tensor, so the state dict keeps the checkpoint's
    keys, loading into them updates the fused tensor, and no memory is duplicated. One big matrix-vector product
    per step instead of several small ones is what makes batch-1 decoding faster. Re-fused automatically when
    the parameters were replaced (e.g. by `.to(dtype)`)."""
    with torch.inference_mode(False), torch.no_grad():      # ordinary tensors, even when first called for inference
        fused = torch.cat([m.weight.detach() for m in modules])
        offset = 0
        for m in modules:
            n = m.weight.shape[0]
            m.weight.data = fused[offset:offset + n]
            offset += n
    return fused


def is_fused(fused: Tensor | None, modules: list[nn.Linear]) -> bool:
    if fused is None:
        return False
    ptr, step = fused.data_ptr(), fused.element_size() * fused.shape[1]
    offset = 0
    for m in modules:
        if m.weight.data_ptr() != ptr + offset * step or m.weight.dtype != fused.dtype:
            return False
        offset += m.weight.shape[0]
    return True


def prepacking_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can run linears with prepacked weights here (CPU, float32 or bfloat16 with hardware)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _version(t: Tensor) -> int:
    """In-place update counter; inference tensors (made under inference_mode) have none and never change."""
    try:
        return t._version
    except RuntimeError:
        return -1


class Linears(nn.Module):
    """Base of the modules below: `x @ w.T` through F.linear, or (when `prepack` is on, CPU only) through oneDNN
    with the weight reordered once into its blocked layout. On CPU this is ~1.5-2x faster than MKL's sgemm for
    float32 with 8-16 rows (batched decoding) and uses AMX/AVX512-BF16 for bfloat16 (prefill ~4x faster than
    float32). The packed copy is rebuilt when the weight changes (new storage or an in-place update); it costs as
    much memory as the weight."""
    prepack: bool = False

    def _linear(self, name: str, x: Tensor, w: Tensor, sources: tuple[nn.Linear, ...]) -> Tensor:
        """`sources`: the Linears whose weights `w` is made of (their version counters tell in-place updates;
        a fused weight does not share them)."""
        if (not self.prepack or x.device.type != "cpu" or torch.compiler.is_compiling()
                or (w.dtype == torch.float32 and x.numel() <= 4 * x.shape[-1])):
            return F.linear(x, w)       # float32 matrix-vector products with <= 4 rows: MKL is as fast or faster
        packs = self.__dict__.setdefault("_packs", {})
        key = (w.data_ptr(), _version(w), w.dtype, tuple(w.shape), tuple(_version(m.weight) for m in sources))
        entry = packs.get(name)
        if entry is None or entry[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                entry = packs[name] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16))
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), entry[1], None, "none", [], "")
        return y.view(*x.shape[:-1], w.shape[0])


class Attention(Linears):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        self._qkv: Tensor | None = None

    def qkv_weight(self) -> Tensor:
        mods = [self.q_proj, self.k_proj, self.v_proj]
        if torch.compiler.is_compiling() and self._qkv is not None:
            return self._qkv                        # fused by compile_decoding; frozen into the compiled graph
        if not is_fused(self._qkv, mods):
            self._qkv = fused_weight(mods)
        return self._qkv

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                rows: slice, where: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """x (R, T, C); cos/sin (R, T, 1, 1, D); where = (cache rows, positions), both (R, T): where each new
        key/value goes; mask (R, 1, T, K) additive (0 or -inf) over the first K cache positions of each row."""
        R, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = self._linear("qkv", x, self.qkv_weight(), (self.q_proj, self.k_proj, self.v_proj)).view(R, T, 3, H, D)
        qk = qkv[:, :, :2]
        qk = qk * cos + rotate_half(qk) * sin                      # RoPE on q and k at once; cos (R, T, 1, 1, D)
        q, k = qk.unbind(2)
        row_ids, positions = where
        k_cache[row_ids, :, positions] = k
        v_cache[row_ids, :, positions] = qkv[:, :, 2]
        K = mask.shape[-1]
        keys = k_cache[rows, :, :K]                                          # (R, H, K, D), no copy
        values = v_cache[rows, :, :K]
        if T == 1 and torch.compiler.is_compiling() and x.device.type == "cpu":   # not measured on CUDA
            out = decode_attention(q.transpose(1, 2), keys, values, mask)
        else:
            # SDPA reads the strided cache in place (plain bf16 matmuls would copy it: 4x slower on CPU)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self._linear("o", out.transpose(1, 2).reshape(R, T, H * D), self.o_proj.weight, (self.o_proj,))


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of one new position per row, q (R, H, 1, D), over the cache keys/values (R, H, K, D) with an
    additive mask (R, 1, 1, K), written as products and sums accumulated in float32. For the compiled decoding
    step only: Inductor fuses each of the two reductions into one pass over the strided cache, 4-6x faster than
    SDPA's kernel on CPU for one query (16 rows, 16 heads, bf16: 0.5 vs 3.2 ms at 200 cached positions, 3.6 vs
    15.6 ms at 1000); run eagerly it would materialise (R, H, K, D) products."""
    scores = (q.float() * keys.float()).sum(-1).unsqueeze(-2) * q.shape[-1] ** -0.5 + mask.float()  # (R, H, 1, K)
    probs = torch.softmax(scores, dim=-1)
    return (probs.transpose(-1, -2) * values.float()).sum(-2, keepdim=True).to(q.dtype)


class MLP(Linears):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._gate_up: Tensor | None = None

    def gate_up_weight(self) -> Tensor:
        mods = [self.gate_proj, self.up_proj]
        if torch.compiler.is_compiling() and self._gate_up is not None:
            return self._gate_up
        if not is_fused(self._gate_up, mods):
            self._gate_up = fused_weight(mods)
        return self._gate_up

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self._linear("gate_up", x, self.gate_up_weight(), (self.gate_proj, self.up_proj)).chunk(2, dim=-1)
        return self._linear("down", F.silu(gate) * up, self.down_proj.weight, (self.down_proj,))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                rows: slice, where: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, rows, where, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LayerStack(nn.Module):
    """`LlamaModel._run_layers` as a module of its own (what torch.compile freezes: the parameters of a compiled
    module become constants). Kept out of LlamaModel's submodules, so the state dict is unchanged."""

    def __init__(self, model: "LlamaModel"):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model._run_layers(*args)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Kept out of the buffers so that casting the model to bf16 never rounds the frequencies.
        self._inv_freq = {"cpu": llama3_inv_freq(cfg)}
        self._rope: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor]] = {}
        self._compiled_layers = None             # set by compile_decoding()

    def inv_freq(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = self._inv_freq["cpu"].to(device)
        return self._inv_freq[key]

    def set_prepacked_weights(self, enabled: bool) -> bool:
        """Use oneDNN prepacked weights for the layers' linears (see `Linears`) if this device/dtype supports it.
        Returns whether it is on."""
        p = self.norm.weight
        on = bool(enabled) and prepacking_supported(p.device, p.dtype)
        for m in self.modules():
            if isinstance(m, Linears):
                m.prepack = on
                m.__dict__.pop("_packs", None)
        return on

    def compile_decoding(self) -> None:
        """Run decoding steps (T = 1, at least two rows) through torch.compile from now on.

        The first step compiles (1.5 to 2 minutes for the official size on 2 CPU cores): call it at load time
        and warm it up. Prefill, and a step with a single row (one request without CFG: sizes 1 are specialised
        by the compiler, so it would compile a second graph), stay eager (with the oneDNN packs if enabled). The
        weights are frozen into the graph (on CPU Inductor keeps its own packed copy): load them before, not
        after. On CPU this pays in bfloat16 (decoding 1.4x faster for one request, 1.9x for eight on an AMD Zen 4:
        the small operations fused, the cache read once per reduction); float32 decoding is mostly bound by
        reading the weights."""
        p = self.norm.weight
        for layer in self.layers:                # fuse now: under compilation the weights are taken as they are
            layer.self_attn.qkv_weight()
            layer.mlp.gate_up_weight()
        if p.device.type == "cpu":
            # Inductor's freezing (weights as constants, packed for oneDNN) is a process-wide setting: it does not
            # take effect through torch.compile(options=...). It only concerns graphs compiled for inference.
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
        # Without this the compiler unifies sizes that happen to be equal when it traces (the cache's rows and
        # the rows decoding, say) and compiles again whenever they differ.
        import torch.fx.experimental._config as fx_config
        fx_config.use_duck_shape = False
        step = _LayerStack(self)
        self.__dict__["_compiled_layers"] = torch.compile(step, dynamic=True)

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        p = self.norm.weight
        return KVCache(self.cfg, rows, capacity, device=p.device, dtype=p.dtype)

    def forward(self, x: Tensor, cache: KVCache, rows: slice, start: Tensor | list[int]) -> Tensor:
        """Run T new positions of each row in `rows` (contiguous cache rows) through the decoder.

        x (R, T, C) input embeddings; start (R,) the number of positions each row already holds (its new tokens
        take positions start .. start+T-1, which are also their RoPE positions). Returns the final-norm output
        (R, T, C). Rows whose real input is shorter than T may be right-padded: the padded positions are written
        to the cache but the caller must not count them in that row's length."""
        R, T, _ = x.shape
        if isinstance(start, Tensor):
            K = int(start.max()) + T
        else:                                  # a list: no device round trip to learn the longest row
            K = max(start) + T
            start = torch.tensor(start, dtype=torch.long, device=x.device)
        positions = start[:, None] + torch.arange(T, device=x.device)[None, :]          # (R, T)
        cache.ensure(rows.stop, K)
        cos_table, sin_table = self.rope_table(cache.capacity, x.device, x.dtype)
        cos, sin = cos_table[positions][:, :, None, None], sin_table[positions][:, :, None, None]
        where = (torch.arange(rows.start, rows.stop, device=x.device)[:, None].expand(R, T), positions)
        key_pos = torch.arange(K, device=x.device)
        allowed = (key_pos[None, None, :] <= positions[:, :, None])[:, None]          # (R, 1, T, K)
        mask = torch.zeros(allowed.shape, device=x.device, dtype=x.dtype).masked_fill_(~allowed, float("-inf"))
        run = self._compiled_layers if self._compiled_layers is not None and T == 1 and R > 1 else self._run_layers
        return run(x, cos, sin, cache.k, cache.v, rows.start, rows.stop, where, mask)

    def _run_layers(self, x: Tensor, cos: Tensor, sin: Tensor, k_caches: list[Tensor], v_caches: list[Tensor],
                    first_row: int, end_row: int, where: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        """The layers and the final norm (what `compile_decoding` compiles; rows as two ints, not a slice, so
        that the compiled graph takes any number of rows)."""
        rows = slice(first_row, end_row)
        for layer, kc, vc in zip(self.layers, k_caches, v_caches):
            x = layer(x, cos, sin, kc, vc, rows, where, mask)
        return self.norm(x)

    def rope_table(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin for positions 0..n-1 (at least), cached; identical to computing them per position."""
        key = (str(device), dtype)
        table = self._rope.get(key)
        if table is None or table[0].shape[0] < n:
            table = rope_cos_sin(self.inv_freq(device), torch.arange(max(n, 1024), device=device), dtype)
            self._rope[key] = table
        return table
