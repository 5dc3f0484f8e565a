"""Batched, continuously batched T3 decoding: many requests advance one speech token per step.

Each request owns one cache row (two with CFG: the conditional row and the unconditional row, whose text-token
embeddings are zero) and its own text length, positions, sampling parameters, repetition history, random
generator and stopping rule. A step
  1. admits waiting requests (while rows are free): prefill of their prefix, which gives their first logits,
     in one forward for all of them (what does not depend on the text, the conditioning positions and the
     unconditional row up to its BOS, is kept per voice and exaggeration in an LRU cache: see `_place`);
  2. turns every active request's logits into a distribution with the variant's sampling chain
     (`engine/sampling.py`: CFG, repetition penalty, temperature, min_p, top_p for the original; temperature,
     top_k, top_p, repetition penalty for Turbo) in one batched call, then draws one token per request with its
     own generator (temperature 0: the greedy token, no draw);
  3. retires the requests that drew EOS (6562) or reached max_new_tokens: their rows leave, and the last rows
     move into the holes so that the active rows stay contiguous;
  4. feeds every remaining request's new token (to both of its rows) through the backbone in one forward.
A request `abort`ed (from any thread) leaves at the start of the next step the same way (its rows retired,
the last rows moved into the holes) and is returned with stop_reason "aborted".
So requests can join between any two steps and leave as soon as they are done; a request with seed s draws
the same tokens alone or in a batch (its own generator; its rows never see other rows).

The prefix reproduces chatterbox-tts 0.1.7: [cond (34) | START text STOP | BOS | BOS], RoPE positions from 0,
generated token i embedded with speech position i+1, repetition history starting with one BOS. With
cfg_weight == 0 the unconditional row is not computed at all (0.1.7 itself fails there).
Turbo's (`T3.inference_turbo`): [speaker | prompt tokens (375) | text | START], one row, GPT-2 positions running
on from 0; the history is [START] for the first draw, then the generated tokens. Its conditioning positions
depend on the voice only, so their keys/values are the per-voice cache entry (the 376-position prefill is paid
once per voice); the text and START are computed per request. Which layout a model has is the model's
(`T3.frame_text`, `T3.text_embeds`); which chain samples is the variant's (`SamplingChain`).
A model with `alignment_stop` (Multilingual) also gets 0.1.7's alignment analyser per request
(engine/alignment.py): the forwards record a few heads' attention of each conditional row over its text, and
before the chain runs the analyser suppresses or forces the stop token in that request's raw logits.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .alignment import AlignmentStopping
from .models.t3 import T3
from .sampling import CFGMinPChain, SamplingChain, sample
from .contract import SynthesisParams


@dataclass
class T3Request:
    text_ids: Sequence[int]                  # text token ids, without [START] / [STOP]
    speaker_emb: Tensor                      # (1, 256) or (256,): voice-encoder embedding
    prompt_tokens: Tensor                    # (1, P) or (P,): conditioning speech tokens
    params: SynthesisParams = field(default_factory=SynthesisParams)
    max_new_tokens: int = 1000
    cond: Tensor | None = None               # (cond_len, C): precomputed conditioning (e.g. cached per voice)
    forced_tokens: Sequence[int] | None = None   # teacher forcing: feed these instead of sampling
    record: bool = False                     # keep every step's raw logits and sampled distribution
    request_id: str = ""


@dataclass
class T3Result:
    request: T3Request
    generated: Tensor                        # (S,) every token drawn, EOS included if drawn
    speech_tokens: Tensor                    # (M,) what S3Gen takes: cut at the first EOS, ids < 6561 only
    stop_reason: str                         # "eos", "max_new_tokens" or "aborted" (`T3Decoder.abort`)
    logits: Tensor | None = None             # (S, 2, V) raw logits, row 1 unconditional ((S, 1, V) without CFG)
    probs: Tensor | None = None              # (S, V) the distributions sampled
    alignment: Tensor | None = None          # (S + 1, text + 2) alignment rows (alignment-stopping models, record)


@dataclass
class _Active:
    request: T3Request
    rows: list[int]                          # cache rows: [cond] or [cond, uncond]
    seen: Tensor                             # (V,) bool: ids in the repetition history
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)
    align: object | None = None              # alignment.AlignmentAnalyzer (models with alignment_stop)


def postprocess(generated: Tensor, stop_token: int, start_token: int) -> Tensor:
    """The official clean-up: keep what precedes the first EOS, then only real speech ids (< start_token)."""
    eos = (generated == stop_token).nonzero()
    if len(eos):
        generated = generated[: int(eos[0, 0])]
    return generated[generated < start_token]


class T3Decoder:
    """Continuous-batching decoder over one T3 model. Not thread-safe: drive it from one thread.

    Keep one per worker for the process lifetime (its per-voice prefix cache then pays off): `submit` requests
    at any time, call `step` in a loop while `busy`; each call returns the requests finished in that step.
    `max_rows` bounds the batch (a CFG request takes 2 rows) and so the KV cache: about
    rows x (prefix + generated tokens) x 245 KB in float32 (half in bfloat16) for the official size."""

    def __init__(self, model: T3, max_rows: int = 32, initial_capacity: int = 512, prefix_cache_size: int = 8,
                 max_cached_text: int = 512, chain: SamplingChain | None = None):
        self.model = model
        self.chain = chain if chain is not None else CFGMinPChain()
        self.prefix_cache_size = prefix_cache_size    # voices whose text-independent keys/values are kept
        self.max_cached_text = max_cached_text        # longest text (tokens + 2) whose uncond. positions are kept
        self.prefix_cache: OrderedDict[bytes, list[tuple[Tensor, Tensor]]] = OrderedDict()
        self.cfg = model.cfg
        self.max_rows = max_rows
        self.cache = model.tfmr.new_cache(rows=0, capacity=initial_capacity)
        self.waiting: deque[T3Request] = deque()
        self.active: list[_Active] = []
        self.row_owner: list[_Active] = []        # row -> request
        self.row_len: list[int] = []              # row -> positions held in the cache
        self.next_logits: Tensor | None = None    # (rows, V) logits for each row's next token
        self._aborts: set[str] = set()            # request ids to drop at the next step (`abort`, any thread)
        self._abort_lock = threading.Lock()
        self.steps_taken = 0                      # for figures: decoding steps run, rows summed over them, and
        self.row_steps = 0                        # seconds spent in `step`
        self.step_seconds = 0.0
        # Multilingual: stopping decided by the text alignment of some heads (engine/alignment.py)
        self.alignment = AlignmentStopping(model) if getattr(model.cfg, "alignment_stop", False) else None

    # ---- public ---------------------------------------------------------------------------------------------
    def validate(self, req: T3Request) -> None:
        """Raise ValueError (with a message fit for the caller) for a request this model cannot run."""
        cfg = self.cfg
        if req.text_ids and (min(req.text_ids) < 0 or max(req.text_ids) >= cfg.text_vocab_size):
            raise ValueError(f"text token ids must be in [0, {cfg.text_vocab_size})")
        if req.cond is None:
            if req.speaker_emb.numel() != cfg.speaker_embed_size:
                raise ValueError(f"speaker embedding has {req.speaker_emb.numel()} values, "
                                 f"expected {cfg.speaker_embed_size}")
            p = req.prompt_tokens.reshape(-1)
            if not 1 <= p.numel() <= (cfg.max_speech_positions if cfg.learned_positions else cfg.max_positions):
                raise ValueError("conditioning prompt must hold at least one speech token and fit the model")
            if p.min() < 0 or p.max() >= cfg.speech_vocab_size:
                raise ValueError("conditioning prompt tokens out of range")
        elif (req.cond.dim() != 2 or req.cond.shape[1] != cfg.hidden_size
              or (cfg.perceiver and req.cond.shape[0] != cfg.cond_len)):
            raise ValueError(f"cond must have shape ({cfg.cond_len if cfg.perceiver else 'P + 1'}, {cfg.hidden_size})")
        self.model.check_lengths(len(req.text_ids), self._cond_len(req) - self.model.cond_len(0),
                                 req.max_new_tokens)
        if req.forced_tokens is not None and not 1 <= len(req.forced_tokens) <= req.max_new_tokens:
            raise ValueError("forced_tokens must hold 1..max_new_tokens tokens")
        if self._rows_needed(req) > self.max_rows:
            raise ValueError("max_rows is too small for one request")

    def submit(self, req: T3Request) -> None:
        self.validate(req)
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        """Drop every request (waiting or active) with this `request_id` at the next `step`: its rows are
        retired then (the last rows move into the holes, as for a finished request; later admissions reuse them)
        and `step` returns it with stop_reason "aborted" (the tokens drawn so far, no speech tokens). Thread-safe:
        callable while another thread steps. An id that matches nothing at the next step stays pending until
        `clear_aborts`. Other requests' tokens do not change (a row never sees other rows)."""
        if request_id:
            with self._abort_lock:
                self._aborts.add(request_id)

    def clear_aborts(self) -> None:
        with self._abort_lock:
            self._aborts.clear()

    def release_memory(self) -> None:
        """Free the KV cache and the conditioning cache when idle (they are rebuilt on demand)."""
        if self.active:
            raise RuntimeError("release_memory() while requests are active")
        self.cache = self.model.tfmr.new_cache(rows=0, capacity=0)
        self.prefix_cache.clear()
        self.next_logits = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def rows_in_use(self) -> int:
        return len(self.row_owner)

    @torch.inference_mode()
    def conditioning(self, req: T3Request) -> Tensor:
        """(cond_len, C) conditioning embeddings of a request (the same for both CFG rows)."""
        if req.cond is not None:
            return req.cond.to(self.model.device, self.model.dtype)
        exaggeration = torch.tensor([req.params.exaggeration], dtype=torch.float32)
        return self.model.conditioning(req.speaker_emb.reshape(1, -1), req.prompt_tokens.reshape(1, -1),
                                       exaggeration)[0]

    @torch.inference_mode()
    def admit(self) -> None:
        """Prefill waiting requests while rows are free (`step` does this first; callable alone, e.g. to time it).
        All requests admitted together share one forward over their rows (see `_prefill`)."""
        batch, rows, longest = [], self.rows_in_use, max(self.row_len, default=0)
        for req in self.waiting:
            if rows + self._rows_needed(req) > self.max_rows:
                break
            batch.append(req)
            rows += self._rows_needed(req)
            longest = max(longest, self._cond_len(req) + 2 * (len(req.text_ids) + 4))
        if not batch:
            return
        self.cache.ensure(rows, longest, max_rows=self.max_rows)     # one allocation for the whole batch
        # rows: the conditional rows of the batch, then its unconditional rows (each block one forward, padded
        # to its own longest input: the unconditional rows mostly have two positions left to compute)
        first, k = self.rows_in_use, len(batch)
        self.row_owner.extend([None] * (rows - first))
        self.row_len.extend([0] * (rows - first))
        feeds: list = [None] * (rows - first)
        uncond = first + k
        for i, req in enumerate(batch):
            self.waiting.popleft()
            pair = (first + i, uncond) if self._rows_needed(req) == 2 else (first + i,)
            uncond += len(pair) - 1
            for row, feed in zip(pair, self._place(req, pair)):
                feeds[row - first] = feed
        self._prefill(first, feeds[:k])
        if rows > first + k:
            self._prefill(first + k, feeds[k:])

    @torch.inference_mode()
    def step(self) -> list[T3Result]:
        """Drop aborted requests, admit, sample one token for every active request, retire finished ones,
        advance the rest."""
        t0 = time.perf_counter()
        aborted = self._drop_aborted()
        self.admit()
        if not self.active:
            return aborted
        self.steps_taken += 1
        self.row_steps += len(self.row_owner)
        self._sample()
        finished = [a for a in self.active if self._is_done(a)]
        if finished:
            self._retire(finished)
        if self.active:
            self._advance()
        self.step_seconds += time.perf_counter() - t0
        return aborted + [self._result(a) for a in finished]

    def run(self, requests: Sequence[T3Request]) -> list[T3Result]:
        """Decode `requests` to the end (sharing steps with whatever else is queued); results in input order."""
        for r in requests:
            self.submit(r)
        done: dict[int, T3Result] = {}
        wanted = {id(r) for r in requests}
        while self.busy and not wanted <= done.keys():
            for res in self.step():
                done[id(res.request)] = res
        return [done[id(r)] for r in requests]

    # ---- internals -----------------------------------------------------------------------------------------
    def _drop_aborted(self) -> list[T3Result]:
        with self._abort_lock:
            ids = set(self._aborts)
        if not ids:
            return []
        out = []
        if any(r.request_id in ids for r in self.waiting):
            keep = deque()
            for r in self.waiting:
                if r.request_id in ids:
                    out.append(self._aborted_result(r, []))
                else:
                    keep.append(r)
            self.waiting = keep
        gone = [a for a in self.active if a.request.request_id in ids]
        if gone:
            self._retire(gone)
            out.extend(self._aborted_result(a.request, a.tokens) for a in gone)
        return out

    @staticmethod
    def _aborted_result(req: T3Request, tokens: list[int]) -> T3Result:
        return T3Result(request=req, generated=torch.tensor(tokens, dtype=torch.long),
                        speech_tokens=torch.zeros(0, dtype=torch.long), stop_reason="aborted")

    def _remember(self, key: bytes, kv: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        self.prefix_cache[key] = kv
        self.prefix_cache.move_to_end(key)
        while len(self.prefix_cache) > self.prefix_cache_size:
            self.prefix_cache.popitem(last=False)
        return kv

    def _cond_len(self, req: T3Request) -> int:
        """The request's conditioning positions."""
        if req.cond is not None:
            return int(req.cond.shape[0])
        return self.model.cond_len(req.prompt_tokens.numel())

    def _cond_key(self, req: T3Request) -> bytes | None:
        """What the conditioning positions depend on: the voice (speaker embedding + prompt tokens, or a given
        cond) and, for a model that conditions on it, the exaggeration."""
        if self.prefix_cache_size <= 0:
            return None
        h = hashlib.sha256()
        if req.cond is not None:
            h.update(b"cond:" + req.cond.detach().to("cpu", torch.float32).numpy().tobytes())
        else:
            h.update(b"spk:" + req.speaker_emb.detach().to("cpu", torch.float32).numpy().tobytes())
            h.update(b"prompt:" + req.prompt_tokens.detach().to("cpu", torch.long).numpy().tobytes())
            if self.cfg.perceiver:
                h.update(b"exaggeration:" + repr(float(req.params.exaggeration)).encode())
        return h.digest()

    def _rows_needed(self, req: T3Request) -> int:
        return self.chain.rows_needed(req.params)

    def _place(self, req: T3Request, rows: tuple[int, ...]) -> list[tuple[Tensor, int]]:
        """Fill the request's cache rows (conditional[, unconditional]) with its text-independent prefix; return
        what each row still has to compute: (input embeddings (t, C), first position), for `_prefill`.

        The conditioning positions depend only on the voice and the exaggeration, and are the same in both CFG
        rows. The unconditional row continues with text POSITION embeddings only (its token embeddings are
        zero), so up to its two BOS it depends on the voice and the text length, and (causal attention) each
        position only on those before it. So one cache entry per voice holds the unconditional row's keys/values
        for [conditioning | positions of the longest text seen so far] (grown when a longer text arrives): a
        request then computes its conditional row's text and BOS positions and two BOS positions of the
        unconditional row, about half the prefill work."""
        m, cfg = self.model, self.cfg
        device = m.device
        text = m.frame_text(req.text_ids)
        use_cfg = len(rows) == 2
        x = m.text_embeds(text, cfg=use_cfg)                     # (R, n_after, C): text, BOS, BOS | text, START
        n_after, n_cond = x.shape[1], self._cond_len(req)
        n_text = n_after - 2                                     # (CFG layout) text positions before the BOS pair
        first, u = rows[0], rows[-1]
        self.cache.ensure(max(rows) + 1, n_cond + n_after)
        key = self._cond_key(req)
        entry = self.prefix_cache.get(key) if key is not None else None
        if entry is None:
            m.tfmr(self.conditioning(req)[None], self.cache, slice(first, first + 1), [0])
            if key is not None:
                entry = self._remember(key, self.cache.read(first, n_cond))
        else:
            self.prefix_cache.move_to_end(key)
            self.cache.write(first, entry, n_cond)
        feeds = [(x[0], n_cond)]                                # conditional row: text, BOS, BOS (or text, START)
        if use_cfg and (entry is None or n_text > self.max_cached_text):
            self.cache.move_row(first, u, n_cond)
            feeds.append((x[1], n_cond))
        elif use_cfg:
            cached = entry[0][0].shape[1] - n_cond                             # text positions already there
            self.cache.write(u, entry, n_cond + min(cached, n_text))
            if cached < n_text:
                m.tfmr(x[1:, cached:n_text], self.cache, slice(u, u + 1), [n_cond + cached])
                self._remember(key, self.cache.read(u, n_cond + n_text))
            feeds.append((x[1, n_text:], n_cond + n_text))                    # unconditional row: BOS, BOS
        seen = torch.zeros(cfg.speech_vocab_size, dtype=torch.bool, device=device)
        seen[cfg.start_speech_token] = True
        gen = torch.Generator(device=device)
        gen.manual_seed(int(req.params.seed))
        a = _Active(request=req, rows=list(rows), seen=seen, generator=gen)
        if self.alignment is not None:
            a.align = self.alignment.start(n_cond, n_text)
        self.active.append(a)
        for r in rows:
            self.row_owner[r], self.row_len[r] = a, n_cond + n_after
        return feeds

    def _prefill(self, first: int, feeds: list[tuple[Tensor, int]]) -> None:
        """One forward over rows first.. (rows `_place` filled), each fed its own
        positions, right-padded to the longest (a padded position lands past its row's length, where the next
        token overwrites it and no query of that row looks); keeps each row's logits at its last real position.
        Reading the weights once for the whole batch is what makes admitting many requests cheap."""
        m = self.model
        R, T = len(feeds), max(f.shape[0] for f, _ in feeds)
        x = feeds[0][0].new_zeros(R, T, feeds[0][0].shape[-1])
        for r, (f, _) in enumerate(feeds):
            x[r, :f.shape[0]] = f
        with (self.alignment.watch_prefill(first, self.row_owner[first:first + R], [f.shape[0] for f, _ in feeds])
              if self.alignment is not None else contextlib.nullcontext()):
            hidden = m.tfmr(x, self.cache, slice(first, first + R), [start for _, start in feeds])
        last = torch.tensor([f.shape[0] - 1 for f, _ in feeds], device=hidden.device)
        logits = m.logits(hidden[torch.arange(R, device=hidden.device), last])
        self.next_logits = logits if self.next_logits is None or first == 0 else torch.cat((self.next_logits[:first], logits))

    def _sample(self) -> None:
        act = self.active
        device = self.model.device
        cond_rows = torch.tensor([a.rows[0] for a in act], device=device)
        uncond_rows = torch.tensor([a.rows[-1] for a in act], device=device)
        raw = cond, uncond = self.next_logits.index_select(0, cond_rows), self.next_logits.index_select(0, uncond_rows)
        if self.alignment is not None:       # stop suppressed / forced by the alignment (before the chain)
            cond, uncond = self.alignment.adjust(act, cond, uncond)
        seen = torch.stack([a.seen for a in act])
        probs, greedy = self.chain.process(cond, uncond, seen, [a.request.params for a in act],
                                           rows=[len(a.rows) for a in act])
        forced = [a.request.forced_tokens is not None for a in act]
        if all(forced):
            tokens = [int(a.request.forced_tokens[len(a.tokens)]) for a in act]
        else:
            sampled = sample(probs, [a.generator for a in act], greedy).tolist()
            tokens = [int(a.request.forced_tokens[len(a.tokens)]) if f else t
                      for a, f, t in zip(act, forced, sampled)]
        for i, (a, tok) in enumerate(zip(act, tokens)):
            if a.request.record:
                rows = raw[0][i : i + 1] if len(a.rows) == 1 else torch.stack((raw[0][i], raw[1][i]))
                a.logits.append(rows.float().cpu())
                a.probs.append(probs[i].cpu())
            if not a.tokens and not self.chain.keeps_start_in_history:
                a.seen[self.cfg.start_speech_token] = False          # Turbo: START is the history of step 0 only
            a.tokens.append(tok)
            a.seen[tok] = True

    def _is_done(self, a: _Active) -> bool:
        limit = len(a.request.forced_tokens) if a.request.forced_tokens is not None else a.request.max_new_tokens
        return a.tokens[-1] == self.cfg.stop_speech_token or len(a.tokens) >= limit

    def _retire(self, finished: list[_Active]) -> None:
        gone = {id(a) for a in finished}
        self.active = [a for a in self.active if id(a) not in gone]
        freed = sorted((r for a in finished for r in a.rows), reverse=True)
        keep = torch.arange(len(self.row_owner))
        for r in freed:
            last = len(self.row_owner) - 1
            if r != last:
                owner = self.row_owner[last]
                self.cache.move_row(last, r, self.row_len[last])
                keep[r] = keep[last]
                owner.rows[owner.rows.index(last)] = r     # in place: rows stay [cond, uncond]
                self.row_owner[r], self.row_len[r] = owner, self.row_len[last]
            self.row_owner.pop()
            self.row_len.pop()
        n = len(self.row_owner)
        self.next_logits = self.next_logits.index_select(0, keep[:n].to(self.next_logits.device)) if n else None

    def _advance(self) -> None:
        m = self.model
        device = m.device
        n = self.rows_in_use
        tokens = torch.tensor([self.row_owner[r].tokens[-1] for r in range(n)], device=device)
        positions = torch.tensor([len(self.row_owner[r].tokens) for r in range(n)], device=device)
        x = m.speech_embeds(tokens, positions)                                 # (n, 1, C)
        with self.alignment.watch_step(self.row_owner[:n]) if self.alignment is not None else contextlib.nullcontext():
            hidden = m.tfmr(x, self.cache, slice(0, n), self.row_len)
        self.next_logits = m.logits(hidden[:, -1])
        self.row_len = [length + 1 for length in self.row_len]

    def _result(self, a: _Active) -> T3Result:
        generated = torch.tensor(a.tokens, dtype=torch.long)
        stop = "eos" if a.tokens[-1] == self.cfg.stop_speech_token else "max_new_tokens"
        return T3Result(
            request=a.request, generated=generated,
            speech_tokens=postprocess(generated, self.cfg.stop_speech_token, self.cfg.start_speech_token),
            stop_reason=stop,
            logits=torch.stack(a.logits) if a.request.record else None,
            probs=torch.stack(a.probs) if a.request.record else None,
            alignment=a.align.alignment if a.request.record and a.align is not None else None)


def generate(model: T3, requests: Sequence[T3Request], max_rows: int = 32,
             chain: SamplingChain | None = None) -> list[T3Result]:
    """Decode a batch of requests together (continuous batching inside); results in input order."""
    return T3Decoder(model, max_rows=max_rows, chain=chain).run(requests)


def teacher_force(model: T3, request: T3Request, tokens: Sequence[int], chain: SamplingChain | None = None
                  ) -> T3Result:
    """Feed the recorded `tokens` instead of sampling; the result holds each step's raw logits (S, 2, V) and
    the distribution the sampler would have drawn from (S, V)."""
    req = T3Request(text_ids=request.text_ids, speaker_emb=request.speaker_emb,
                    prompt_tokens=request.prompt_tokens, params=request.params,
                    max_new_tokens=max(request.max_new_tokens, len(tokens)), cond=request.cond,
                    forced_tokens=list(tokens), record=True, request_id=request.request_id)
    return T3Decoder(model, max_rows=2, chain=chain).run([req])[0]


def parity_outputs(ckpt_dir: Path, ref: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    """This engine's versions of the recorded T3 tensors: `t3.text_tokens` (the variant's text front-end on the
    normalised text), `t3.logits` ((S, 2, V) with CFG, (S, V) for Turbo) and `t3.probs` (S, V) teacher-forcing the
    recorded `t3.tokens`, conditioned on the recorded `cond.ve_embedding` / `cond.t3_prompt_tokens`, with the
    variant's sampling chain and the recorded parameters, in float32 on CPU. Multilingual: the text in the recorded
    `language`, and `t3.alignment`, the alignment analyser's rows."""
    from .checkpoint import read_config
    from .variants import detect_variant
    ckpt_dir = Path(ckpt_dir)
    variant = detect_variant(ckpt_dir)
    text_front_end = variant.load_text(ckpt_dir)
    text = meta.get("normalised_text") or text_front_end.normalize(meta["text"])
    text_ids = text_front_end.encode(text, meta.get("language"))
    model = T3.from_checkpoint(ckpt_dir, device="cpu", dtype=torch.float32,
                               config=variant.architecture(read_config(ckpt_dir)), filename=variant.t3_file)

    params = SynthesisParams(
        exaggeration=float(meta.get("exaggeration", 0.5)), cfg_weight=float(meta.get("cfg_weight", 0.5)),
        temperature=float(meta.get("temperature", 0.8)), min_p=float(meta.get("min_p", 0.05)),
        top_p=float(meta.get("top_p", 1.0)), repetition_penalty=float(meta.get("repetition_penalty", 1.2)),
        seed=int(meta.get("sample_seed", 0)), top_k=int(meta.get("top_k", 1000)))
    tokens = ref["t3.tokens"].reshape(-1).tolist()
    req = T3Request(text_ids=text_ids, speaker_emb=ref["cond.ve_embedding"],
                    prompt_tokens=ref["cond.t3_prompt_tokens"], params=params, max_new_tokens=len(tokens))
    res = teacher_force(model, req, tokens, chain=variant.load_chain())
    logits = res.logits
    if "t3.logits" in ref and ref["t3.logits"].dim() == 2:        # recorded without a CFG row dimension
        logits = logits[:, 0]
    out = {"t3.text_tokens": torch.tensor(text_ids, dtype=ref["t3.text_tokens"].dtype
                                          if "t3.text_tokens" in ref else torch.int32),
           "t3.logits": logits, "t3.probs": res.probs}
    if res.alignment is not None:       # Multilingual: the analyser's alignment rows
        out["t3.alignment"] = res.alignment
    return out
