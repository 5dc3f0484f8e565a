"""Alignment-based stopping for the Multilingual model: chatterbox-tts 0.1.7 `AlignmentStreamAnalyzer`, written
again for batched decoding.

Some of T3's attention heads align speech with text: at each step the conditional CFG row's new position
attends mostly to the text token being spoken. 0.1.7 reads heads (12, 15), (13, 11) and (9, 2) (T3Config
`alignment_heads`), averages their attention probabilities over the text positions ([START] text [STOP], S
columns) and, per step (`AlignmentAnalyzer.step`, before the repetition penalty, on the CFG-combined logits):
  * appends the step's rows to the alignment matrix A (the first step, the prefill, gives two rows: both
    start-of-speech positions), columns beyond the step number zeroed (monotonic mask);
  * the text position is the argmax of the last row, unless it jumped (not -4 < jump < 7);
  * `complete` once the position reaches S - 3 (then `completed_at` = rows of A at that step);
  * the stop token is suppressed (logit -2**15) while the last row's argmax is short of S - 3 (texts of more
    than 5 positions);
  * the stop token is forced (every logit -2**15, the stop token's +2**15) on a long tail (after completion,
    some of the last 3 text columns summing to 5 or more), on alignment repetition (after completion, the
    per-row maxima over the columns but the last 5 summing to more than 5), or when the last two tokens of the
    history ([BOS] and the tokens drawn) are the same.
The false-start and discontinuity flags of the official only feed its report; `false_start` changes nothing
there, so it is not computed here.

How the probabilities are read (`AlignmentSpy`): 0.1.7 turns the whole backbone to eager attention with
`output_attentions`. Here every layer keeps its kernel; forward hooks on the chosen layers' attention recompute,
for the rows and queries asked for, the chosen heads' probabilities: softmax(q k^T / sqrt(d) + mask) in float32
from the layer's input (q_proj, RoPE) and the keys just written to the KV cache: the same numbers as eager
attention to float rounding, for a few rows and heads only. The hooks are registered once per model and do
nothing unless a decoder asks (`AlignmentSpy.watch`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.llama import rotate_half

FORCE = 2.0 ** 15             # the official's ±2**15 (safe in every dtype of 16 bits or more)
SUPPRESS_UNTIL = 3            # the stop token is suppressed until the position reaches S - 3
MIN_TEXT_TO_SUPPRESS = 5      # ... for texts of more than 5 positions
TAIL_COLUMNS = 3              # long tail: the last 3 text columns
TAIL_LIMIT = 5.0              # summed over the rows since completion: >= 5 frames (200 ms)
REPEAT_SKIP = 5               # alignment repetition: columns but the last 5
REPEAT_LIMIT = 5.0            # summed per-row maxima since completion: > 5
JUMP = (-4, 7)                # a position change outside (-4, 7) is a discontinuity: the position is kept


@dataclass
class AlignmentAnalyzer:
    """One request's analyser: the alignment matrix and the decisions of 0.1.7's `step`."""
    n_text: int                                    # S: text positions, [START] and [STOP] included
    keys: tuple[int, int] = (0, 0)                 # where they sit in the conditional cache row
    rows: list[Tensor] = field(default_factory=list)   # A, one (k, S) chunk per step
    n_rows: int = 0
    frame: int = 0                                 # steps taken (curr_frame_pos)
    text_position: int = 0
    complete: bool = False
    completed_at: int | None = None
    pending: Tensor | None = None                  # the probabilities of the last forward, (k, S)
    forced: str | None = None                      # why the stop token was forced, when it was

    @property
    def alignment(self) -> Tensor:
        """A (steps + 1, S): the rows so far."""
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.n_text)

    def step(self, history: list[int]) -> tuple[bool, bool]:
        """Take the last forward's probabilities (`pending`) and the token history ([BOS] and the tokens drawn);
        return (suppress the stop token, force the stop token)."""
        chunk = self.pending
        if chunk is None:
            raise RuntimeError("alignment: no attention was recorded for this step")
        self.pending = None
        chunk = chunk.float().clone()
        chunk[:, self.frame + 1:] = 0
        self.rows.append(chunk)
        self.n_rows += chunk.shape[0]
        S = self.n_text
        position = int(chunk[-1].argmax())
        if JUMP[0] < position - self.text_position < JUMP[1]:
            self.text_position = position
        if not self.complete and self.text_position >= S - SUPPRESS_UNTIL:
            self.complete, self.completed_at = True, self.n_rows
        long_tail = repetition = False
        if self.complete:
            since = self.alignment[self.completed_at:]
            if since.shape[0]:
                long_tail = bool(since[:, -TAIL_COLUMNS:].sum(dim=0).max() >= TAIL_LIMIT)
                before = since[:, :-REPEAT_SKIP] if S > REPEAT_SKIP else since[:, :0]
                # 0.1.7 fails on a text of 5 positions or fewer here (a max over no columns): counted as 0
                repetition = bool(before.shape[1] and before.max(dim=1).values.sum() > REPEAT_LIMIT)
        token_repetition = len(history) >= 3 and history[-1] == history[-2]
        suppress = position < S - SUPPRESS_UNTIL and S > MIN_TEXT_TO_SUPPRESS
        force = long_tail or repetition or token_repetition
        if force:
            self.forced = "long tail" if long_tail else "alignment repetition" if repetition else "token repetition"
        self.frame += 1
        return suppress, force


def apply_decisions(cond: Tensor, uncond: Tensor, index: int, suppress: bool, force: bool, stop_token: int) -> None:
    """Write a decision into row `index` of the raw conditional and unconditional logits (in place), so that
    the CFG-combined logits are the official ones: with both rows equal there, c + w (c - u) = c."""
    if force:
        for rows in (cond, uncond):
            rows[index].fill_(-FORCE)
            rows[index, stop_token] = FORCE
    elif suppress:
        cond[index, stop_token] = -FORCE
        uncond[index, stop_token] = -FORCE


@dataclass
class _Watch:
    row: int                    # row of this forward's batch (0-based)
    queries: list[int]          # query indices within the forward's T
    keys: tuple[int, int]       # text key positions [k0, k1) of that cache row
    analyzer: AlignmentAnalyzer


class AlignmentSpy:
    """Forward hooks on the attention of the layers named in `alignment_heads` of a Llama T3; see the module
    docstring. One per model (`spy_for`)."""

    def __init__(self, model):
        self.heads = list(model.cfg.alignment_heads)
        self.watches: list[_Watch] = []
        self.sums: dict[int, Tensor] = {}
        layers = sorted({layer for layer, _ in self.heads})
        self.handles = [model.tfmr.layers[layer].self_attn.register_forward_hook(self._hook(layer))
                        for layer in layers]

    @contextlib.contextmanager
    def watch(self, watches: list[_Watch]):
        """Record, during the forward run inside the block, the mean probabilities of the heads for `watches`
        into each analyser's `pending`."""
        self.watches = watches
        self.sums = {}
        try:
            yield
            for i, w in enumerate(self.watches):
                if i in self.sums:
                    w.analyzer.pending = self.sums[i] / len(self.heads)
        finally:
            self.watches, self.sums = [], {}

    def _hook(self, layer: int):
        heads = [h for (l, h) in self.heads if l == layer]

        def hook(module, args, output):
            if not self.watches:
                return None
            x, cos, sin, k_cache, _, rows, _, mask = args
            D = module.head_dim
            q_weight = module.qkv_weight()[: module.num_heads * D]       # the layer's own (fused) q projection
            for i, w in enumerate(self.watches):
                # the queries of every head (one small product), in the layer's dtype, as the layer computes them
                q_all = F.linear(x[w.row, w.queries], q_weight).float().view(len(w.queries), -1, D)
                c = cos[w.row, w.queries, 0, 0].float()                                # (n, D)
                s = sin[w.row, w.queries, 0, 0].float()
                keys_all = k_cache[rows.start + w.row, :, :mask.shape[-1]].float()        # (H, K, D)
                m = mask[w.row, 0, w.queries].float()                                  # (n, K)
                for h in heads:
                    q = q_all[:, h]
                    q = q * c + rotate_half(q) * s
                    probs = torch.softmax(q @ keys_all[h].T * D ** -0.5 + m, dim=-1)
                    part = probs[:, w.keys[0]:w.keys[1]].cpu()
                    self.sums[i] = part if i not in self.sums else self.sums[i] + part
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def spy_for(model) -> AlignmentSpy:
    """The model's spy (its hooks registered on first use, once)."""
    spy = model.__dict__.get("_alignment_spy")
    if spy is None:
        spy = model.__dict__["_alignment_spy"] = AlignmentSpy(model)
    return spy


class AlignmentStopping:
    """What T3Decoder calls for a model with `alignment_stop` (see engine/t3_decoder.py): an analyser per request
    (`start`), the watch over a forward (`watch_prefill`, `watch_step`), the decisions on the raw logits before
    the sampling chain (`adjust`)."""

    def __init__(self, model):
        self.model = model
        self.spy = spy_for(model)
        self.stop_token = model.cfg.stop_speech_token
        self.start_token = model.cfg.start_speech_token

    def start(self, n_cond: int, n_text: int) -> AlignmentAnalyzer:
        return AlignmentAnalyzer(n_text=n_text, keys=(n_cond, n_cond + n_text))

    def watch_prefill(self, first: int, owners: list, lengths: list[int]):
        """The prefill forward over rows first..: each conditional row of a request with an analyser, its last
        two real queries (both start-of-speech positions)."""
        watches = [_Watch(r, [n - 2, n - 1], a.align.keys, a.align) for r, (a, n) in enumerate(zip(owners, lengths))
                   if a is not None and a.align is not None and a.rows[0] == first + r]
        return self.spy.watch(watches) if watches else contextlib.nullcontext()

    def watch_step(self, owners: list):
        """A decoding forward over rows 0..: the new position of each conditional row with an analyser."""
        watches = [_Watch(r, [0], a.align.keys, a.align) for r, a in enumerate(owners)
                   if a.align is not None and a.rows[0] == r]
        return self.spy.watch(watches) if watches else contextlib.nullcontext()

    def adjust(self, active: list, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor]:
        """The raw logits (rows in `active` order) with each analyser's decision written in (copies when any)."""
        out = None
        for i, a in enumerate(active):
            if a.align is None:
                continue
            suppress, force = a.align.step([self.start_token, *a.tokens])
            if suppress or force:
                if out is None:
                    out = (cond.clone(), uncond.clone())
                apply_decisions(out[0], out[1], i, suppress, force, self.stop_token)
        return out if out is not None else (cond, uncond)
