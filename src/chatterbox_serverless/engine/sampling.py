"""Speech-token sampling, in the official order, batched with per-row parameters.

chatterbox-tts 0.1.7 turns the speech-head logits into a distribution like this, one request at a time:
    CFG  l = c + w * (c - u)
    repetition penalty (transformers semantics: every token id present in the history, BOS included, once:
                        l < 0 -> l * p, else l / p)
    temperature        l / t
    min_p              drop tokens whose probability < min_p * max probability (the top token always stays)
    top_p              drop the tokens whose ascending cumulative probability <= 1 - top_p (the top one stays)
    softmax, then one multinomial draw.
Here every step of that is one tensor operation over all rows, each row with its own parameters (tensors of
shape (R,)), in float32. Draws use one `torch.Generator` per row, so a request samples the same tokens alone or
in a batch.

Temperature 0 means greedy decoding (the official code would divide by zero): such a row takes the argmax of
its logits after CFG and the repetition penalty (the first id among equal maxima), deterministically and
without drawing from its generator. Its distribution is a point mass on that id (min_p and top_p cannot remove
the top token, so they do not matter). The division uses 1 for those rows, so the other rows of the batch are
computed exactly as they would be without them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """Per-row parameters, tensors of shape (R,) on the logits' device: float32, except top_p in float64 (the
    official threshold `1 - top_p` is computed in double precision, then rounded to float32 once)."""
    cfg_weight: Tensor
    repetition_penalty: Tensor
    temperature: Tensor
    min_p: Tensor
    top_p: Tensor

    @classmethod
    def from_lists(cls, device: torch.device | str, *, cfg_weight, repetition_penalty, temperature, min_p,
                   top_p) -> "SamplingParams":
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)
        return cls(t(cfg_weight), t(repetition_penalty), t(temperature), t(min_p), t(top_p, torch.float64))


def apply_cfg(cond: Tensor, uncond: Tensor, weight: Tensor) -> Tensor:
    """l = c + w * (c - u); a row with w == 0 gets exactly c."""
    return cond + weight[:, None] * (cond - uncond)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """seen (R, V) bool: the ids present in each row's history. Each seen id is penalised once."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """l / t per row; rows with t == 0 (greedy, see `process_logits`) are left as they are."""
    return logits / torch.where(temperature == 0, torch.ones_like(temperature), temperature)[:, None]


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    probs = torch.softmax(logits, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    remove = probs < min_p[:, None] * top
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    if bool((top_p >= 1.0).all()):
        # 1 - top_p == 0 removes only tokens whose probability is exactly 0: nothing changes.
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    threshold = (1.0 - top_p.double()).float()[:, None]   # as `cumulative <= (1 - top_p)` in Python
    remove_sorted = cumulative <= threshold
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(cond: Tensor, uncond: Tensor, seen: Tensor, params: SamplingParams) -> Tensor:
    """Raw conditional / unconditional logits (R, V) -> the distribution to sample from (R, V), float32.
    Rows without CFG pass their conditional logits as `uncond` (with weight 0 or not, the result is `cond`).
    Rows with temperature 0 get a point mass (1.0) on the argmax of their logits after CFG and the repetition
    penalty; `sample` returns that id for them."""
    logits = apply_cfg(cond.float(), uncond.float(), params.cfg_weight)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    greedy = params.temperature == 0
    top = logits.argmax(dim=-1, keepdim=True) if bool(greedy.any()) else None
    logits = apply_temperature(logits, params.temperature)
    logits = apply_min_p(logits, params.min_p)
    logits = apply_top_p(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if top is not None:
        point = torch.zeros_like(probs).scatter_(-1, top, 1.0)
        probs = torch.where(greedy[:, None], point, probs)
    return probs


def greedy_rows(params: SamplingParams) -> Tensor:
    """(R,) bool: the rows that decode greedily (temperature 0)."""
    return params.temperature == 0


def sample(probs: Tensor, generators: list[torch.Generator], greedy: Tensor | None = None) -> Tensor:
    """One multinomial draw per row, row i with generators[i] -> (R,) int64; rows where `greedy` (R,) is True
    take the argmax of their distribution (the point mass `process_logits` made) and draw nothing.

    Each draw is `torch.multinomial` on that row alone, so a seeded generator reproduces the official sampling
    (which draws from the global generator after `torch.manual_seed`)."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows but {len(generators)} generators")
    flags = [False] * len(generators) if greedy is None else greedy.tolist()
    out = [probs[i : i + 1].argmax(dim=-1, keepdim=True) if f else torch.multinomial(probs[i : i + 1], 1, generator=g)
           for i, (g, f) in enumerate(zip(generators, flags))]
    return torch.cat(out).view(-1)


# ---------------------------------------------------------------------------------------------------- Turbo
#
# chatterbox-tts 0.1.7 `T3.inference_turbo`, one request at a time, through transformers' logits processors:
#     temperature        l / t                        (skipped when t == 1; dividing by 1 changes nothing)
#     top_k              drop tokens whose logit is below the k-th largest (ties with it stay)
#     top_p              as above, on the temperature-scaled, top-k-cut logits (skipped when top_p >= 1)
#     repetition penalty on the ids of the history: [START] at the first step, then the tokens generated so far
#                        (START no longer), each id once; after the truncation (-inf stays -inf)
#     softmax, then one multinomial draw. No CFG, no min_p.
# Temperature 0 means greedy decoding, defined as the limit of that chain as t -> 0+: top_p < 1 then keeps only
# the top token, so the draw is the argmax of the raw logits; without top_p (top_p >= 1) the penalty still
# reorders the top_k kept tokens, so it is the argmax of the penalised logits among them (the first id among
# equal maxima either way). The official code cannot do it (it skips the temperature at 0 and samples at t = 1).


@dataclass
class TurboSamplingParams:
    """Per-row parameters, tensors of shape (R,): temperature, repetition_penalty float32, top_p float64 (its
    threshold is computed in double precision, as in Python), top_k int64 (<= 0: no top-k)."""
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    repetition_penalty: Tensor

    @classmethod
    def from_lists(cls, device: torch.device | str, *, temperature, top_k, top_p,
                   repetition_penalty) -> "TurboSamplingParams":
        return cls(torch.tensor(temperature, dtype=torch.float32, device=device),
                   torch.tensor(top_k, dtype=torch.long, device=device),
                   torch.tensor(top_p, dtype=torch.float64, device=device),
                   torch.tensor(repetition_penalty, dtype=torch.float32, device=device))


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Per row: -inf below the k-th largest logit (transformers' TopKLogitsWarper; k <= 0 keeps everything)."""
    V = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    if bool((k >= V).all()):
        return logits
    kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    remove = (logits < kth) & (k < V)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p_rows(logits: Tensor, top_p: Tensor) -> Tensor:
    """`apply_top_p` on the rows with top_p < 1 only (transformers' processor is not applied at all at 1)."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    cut = apply_top_p(logits, torch.where(active, top_p, torch.zeros_like(top_p)))
    return torch.where(active[:, None], cut, logits)


def process_logits_turbo(logits: Tensor, seen: Tensor, params: TurboSamplingParams) -> Tensor:
    """Raw logits (R, V) and history ids `seen` (R, V) bool -> the distribution to sample from (R, V), float32,
    in Turbo's order (see above). Rows with temperature 0 get a point mass on their greedy token."""
    raw = logits.float()
    greedy = params.temperature == 0
    x = apply_temperature(raw, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p_rows(x, params.top_p)
    x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    probs = torch.softmax(x, dim=-1)
    if bool(greedy.any()):
        # the limit t -> 0+: with top_p < 1 only the raw argmax survives; else the penalised argmax of top_k
        limit = apply_repetition_penalty(apply_top_k(raw, params.top_k), seen, params.repetition_penalty)
        limit = torch.where((params.top_p < 1.0)[:, None], raw, limit)
        point = torch.zeros_like(probs).scatter_(-1, limit.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], point, probs)
    return probs


# --------------------------------------------------------------------------------------------------- chains

class SamplingChain:
    """How a variant turns a request's logits into its next token (engine/variants.py picks one): the rows a
    request takes in the KV cache, the batched logits processing, and what the repetition history holds."""
    name = "base"
    keeps_start_in_history = True        # the start-of-speech id stays in the penalty's history after step 0

    def rows_needed(self, params) -> int:
        raise NotImplementedError

    def process(self, cond: Tensor, uncond: Tensor, seen: Tensor, params: list) -> Tensor:
        """cond/uncond (R, V) raw logits (uncond = cond for rows without CFG), seen (R, V), the requests'
        SynthesisParams -> (probs (R, V), greedy (R,) bool)."""
        raise NotImplementedError


class CFGMinPChain(SamplingChain):
    """The original model: CFG (two rows when cfg_weight > 0), repetition penalty, temperature, min_p, top_p."""
    name = "cfg-min_p"
    keeps_start_in_history = True

    def rows_needed(self, params) -> int:
        return 2 if params.cfg_weight > 0 else 1

    def process(self, cond, uncond, seen, params, rows=None):
        p = SamplingParams.from_lists(
            cond.device, cfg_weight=[x.cfg_weight if n == 2 else 0.0 for x, n in zip(params, rows)],
            repetition_penalty=[x.repetition_penalty for x in params], temperature=[x.temperature for x in params],
            min_p=[x.min_p for x in params], top_p=[x.top_p for x in params])
        return process_logits(cond, uncond, seen, p), greedy_rows(p)


class TurboChain(SamplingChain):
    """Turbo: one row, temperature -> top_k -> top_p -> repetition penalty; cfg_weight, min_p and exaggeration
    are ignored (as the official code does, with a warning there). `top_k` comes from the request's params
    (contract.SynthesisParams.top_k, the official default 1000)."""
    name = "turbo"
    keeps_start_in_history = False

    def rows_needed(self, params) -> int:
        return 1

    def process(self, cond, uncond, seen, params, rows=None):
        p = TurboSamplingParams.from_lists(
            cond.device, temperature=[x.temperature for x in params], top_k=[int(x.top_k) for x in params],
            top_p=[x.top_p for x in params], repetition_penalty=[x.repetition_penalty for x in params])
        return process_logits_turbo(cond, seen, p), p.temperature == 0


CHAINS = {c.name: c for c in (CFGMinPChain, TurboChain)}
