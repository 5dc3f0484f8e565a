"""The engine the worker calls: a batch of requests in, one 24 kHz waveform each out.

    requests ─► voice conditionals (cached per clip; conds.pt when none) ─► text normalised, split into chunks
             ─► T3: every chunk of every request in one continuously batched decoding loop ─► speech tokens
             ─► S3Gen flow ─► mel ─► HiFT ─► waveform (+ official fade-in): per request on CPU, batched on CUDA
             ─► chunks joined with a short crossfade ─► Perth watermark ─► result

A failure of one request (bad voice, text the model cannot take, an error in a batched stage) is reported in
its own result; the others go on. `abort(request_id)` (from any thread, while `synthesize` runs) stops a request
at T3's next decoding step (its rows retired, `T3Decoder.abort`) and skips its S3Gen work; its result is the error
"cancelled", and the other requests' audio is what it would have been without the abort.

Streaming (`SynthesisRequest.stream` with an `on_audio` callback): T3 is driven step by step (submit/step, the
same decoding loop `T3Decoder.run` is) and, between two steps, each streamed request whose next chunk (in
order) has its tokens gets that chunk vocoded, joined (`chunking.CrossfadeStream`: the chunk minus the tail the
next chunk is crossfaded with, that joined region then opening the next piece), watermarked and handed to
`on_audio`, while the other rows keep decoding. Streamed requests' chunks are submitted chunk index first, so
every streamed request's first chunk decodes in the first rows. So audio streams between sentence chunks: a
one-chunk request's audio comes in one piece, when it is done. Each piece is watermarked on its own (pieces
under MIN_PIECE_SECONDS wait for the next, so every piece is long enough to carry the mark), and the streamed
request's result is the concatenation of its pieces: it differs from the same request unstreamed by the
watermark near the piece joins (each piece is marked alone) and by float rounding (its chunks are vocoded one
at a time, not two per flow call: ~1e-7 in float32 before the watermark; on CUDA, by S3Gen batching noise).
Same tokens either way (tests/unit/engine/test_streamed_synthesis.py; figures in the README). A batch without streamed requests runs exactly as before (`T3Decoder.run`, S3Gen
after T3): it pays nothing for streaming. Randomness is per request: chunk k of a request with seed s draws from
generators seeded `chunk_seed(s, k)`, so the same request gives the same audio alone or in any batch: on CPU
bit for bit (S3Gen runs request by request there), on CUDA within the bound stated in speech_to_wav.py (S3Gen
batched across requests). T3 draws the same tokens either way; its batched logits move by float noise, which
could change a draw only where the generator's uniform falls within that noise of a cumulative boundary.

The engine is built from a variant's parts (engine/variants.py: `EngineParts`, recognised from the checkpoint's
files): T3 with its sampling chain, the text front-end, S3Gen with its flow solver, the voice front-end with its
settings, the built-in voice, and the tokens the variant appends before S3Gen. It runs the same code for every
variant: the original (CFG, 10-step flow) and Turbo (GPT-2 T3 without CFG, 2-step meanflow, tags in the text).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Generator, Sequence, TypeVar

import numpy as np
import torch

from .chunking import CrossfadeStream, crossfade_join, max_speech_tokens, split_text
from .conditioning import VoiceCache, VoiceConditionals, conditionals_from_bytes, conditionals_to_bytes, front_end_fingerprint
from .models.flow_decoder import pick_attention
from .models.flow import run_steps
from .speech_to_wav import SpeechItem, flow_groups, mel_to_wav, tokens_to_mel_steps
from .t3_decoder import T3Decoder, T3Request
from .variants import EngineParts, detect_variant
from .contract import OnAudio, PreparedVoice, SynthesisRequest, SynthesisResult, VoiceAudio

log = logging.getLogger(__name__)
T = TypeVar("T")

CANCELLED = "cancelled"     # the error of a request stopped by `ChatterboxEngine.abort`
MIN_PIECE_SECONDS = 0.25     # a streamed piece shorter than this is held and sent with the next (watermarkable)


def chunk_seed(seed: int, index: int) -> int:
    """Chunk 0 uses the request's seed as is; later chunks a seed derived from (seed, index)."""
    if index == 0:
        return int(seed)
    digest = hashlib.sha256(f"{int(seed)}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclasses.dataclass
class _Chunk:
    request: int                 # index in the batch
    index: int                   # chunk number within its request
    t3: T3Request
    conds: VoiceConditionals
    seed: int
    tokens: torch.Tensor | None = None
    wav: np.ndarray | None = None


@dataclasses.dataclass
class _Stream:
    """A streamed request's state: its chunks in order, the next one to vocode, the join, the pieces sent."""
    request_id: str
    chunks: list[_Chunk]
    joiner: CrossfadeStream
    next: int = 0
    pieces: list[np.ndarray] = dataclasses.field(default_factory=list)
    first_audio_s: float | None = None


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ChatterboxEngine:
    """Chatterbox TTS loaded once, serving batches. `synthesize` is serialised by a lock (one batch at a time:
    batching across requests, not threads, is how it shares the model)."""

    def __init__(self, ckpt_dir: str | Path | EngineParts, device: str | None = None,
                 dtype: str | torch.dtype | None = None,
                 watermark: bool = True, voice_cache_size: int = 64, max_chunk_chars: int = 280,
                 max_rows: int = 32, crossfade_seconds: float = 0.05, compile: bool = False,
                 max_flow_batch: int | None | str = "auto", flow_attention: str = "auto",
                 s3gen_per_request: bool | str = "auto"):
        """`compile`: run T3's decoding step through torch.compile (see LlamaModel.compile_decoding); the
        compilation happens here, during a short warm-up, not on the first request. `max_flow_batch`: chunks per
        flow-matching call at most ("auto": 2 on CPU, where the estimator is arithmetic-bound and larger batches
        are slower per chunk; no bound on CUDA). `flow_attention`: the estimator's attention kernel, "sdpa",
        "sliced" or "auto" (measured here, see flow_decoder.pick_attention). `s3gen_per_request`: run S3Gen (flow
        and vocoder) for one request's chunks at a time, so that a request's audio is bit-identical alone or in
        any batch ("auto": on CPU, where batching across requests is not faster; on CUDA requests are batched
        and the audio moves within speech_to_wav.CUDA_BATCH_ATOL). A request alone is computed the same way
        either way. `ckpt_dir`: a checkpoint directory (its variant recognised from its files and loaded on
        `device` in `dtype`), or parts already loaded (`Variant.load`; then their device and dtype)."""
        if isinstance(ckpt_dir, EngineParts):
            device, dtype = str(ckpt_dir.t3.device), ckpt_dir.t3.dtype
        self.device = _pick_device(device)
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        if dtype is None:
            dtype = torch.float32   # exact (parity with the official fp32 pipeline) by default
        if dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("float16 is for CUDA; on the CPU use float32 (exact) or bfloat16 (fast on CPUs with AMX or AVX512-BF16)")
        self.dtype = dtype
        if isinstance(ckpt_dir, EngineParts):
            parts = ckpt_dir
        else:
            parts = detect_variant(ckpt_dir).load(ckpt_dir, device=self.device, dtype=dtype)
        self.parts, self.variant = parts, parts.variant
        self.model = parts.variant.api_model      # the API model name it serves (contract.Engine.model)
        self.t3, self.s3gen, self.text = parts.t3, parts.s3gen, parts.text
        estimator = self.s3gen.flow.decoder.estimator
        if flow_attention == "auto":
            c = estimator.config
            flow_attention = pick_attention(c.num_heads, c.attention_head_dim, self.device, dtype)
        estimator.attention = flow_attention
        log.info("flow estimator attention: %s", flow_attention)
        self.voices = VoiceCache(parts.voice_front_end, max_entries=voice_cache_size)
        self.builtin_voice = parts.builtin_voice
        self._suffix = torch.tensor(parts.flow_suffix_tokens, dtype=torch.long)
        self.sample_rate = self.s3gen.sample_rate
        self.watermarker = None
        if watermark:
            from .watermark import Watermarker
            self.watermarker = Watermarker(device=self.device)
        self.max_chunk_chars = max_chunk_chars
        self.max_rows = max_rows
        # the official bound (1000 tokens, 40 s); a chunk's is lower where the model's positions end first
        self.max_new_tokens = self.variant.max_new_tokens
        self.crossfade_seconds = crossfade_seconds
        self.max_flow_batch = (2 if self.device.type == "cpu" else None) if max_flow_batch == "auto" else max_flow_batch
        self.s3gen_per_request = self.device.type == "cpu" if s3gen_per_request == "auto" else bool(s3gen_per_request)
        # one long-lived decoder: its per-voice prefix cache (text-independent keys/values) outlives a batch
        self.decoder = T3Decoder(self.t3, max_rows=max_rows, chain=parts.chain)
        self._lock = threading.Lock()
        self._aborted: set[str] = set()          # request ids aborted during the current `synthesize`
        self._abort_lock = threading.Lock()
        if compile:
            self._compile_t3()

    def _compile_t3(self) -> None:
        log.info("compiling T3's decoding step (about a minute on a CPU; cached on disk for the next start)")
        t0 = time.perf_counter()
        self.t3.tfmr.compile_decoding()
        cfg, conds = self.t3.cfg, self.builtin_voice
        speaker = conds.speaker_emb if conds is not None else torch.zeros(1, cfg.speaker_embed_size)
        prompt = conds.t3_prompt_tokens if conds is not None else torch.zeros(1, 10, dtype=torch.long)
        # two requests: the compiled step serves two rows or more (one request without CFG is one row)
        warm = [T3Request(text_ids=self.text.encode(self.text.normalize("Hello.")), speaker_emb=speaker,
                          prompt_tokens=prompt, max_new_tokens=2) for _ in range(2)]
        with torch.inference_mode():
            self.decoder.run(warm)
        log.info("T3 decoding step compiled in %.1f s", time.perf_counter() - t0)

    def new_core(self, config=None):
        """An engine core over this engine (engine/core.py): requests added and stepped one token at a time, the
        way the worker drives it. `synthesize` (a whole batch at once) and a core must not run at the same time
        from two threads: both hold the engine's lock while they compute, one step or one batch at a time."""
        from .core import EngineCore
        return EngineCore(self, config)

    # --- library voices (contract.VoicePreparer) ----------------------------------------------------------------
    @property
    def voice_variant(self) -> str:
        """What prepared conditionals fit: the front-end networks' content hash (computed once, on first use)."""
        variant = getattr(self, "_voice_variant", None)
        if variant is None:
            variant = self._voice_variant = (f"chatterbox:{self.variant.name}:"
                                             + front_end_fingerprint(self.voices.front_end))
        return variant

    def prepare_voice(self, voice: VoiceAudio) -> PreparedVoice:
        """The clip's conditionals, serialised: the very ones a request with this clip as `voice` uses (the same
        front end and cache), so a library voice speaks exactly as its clip given as reference audio."""
        variant = self.voice_variant
        with self._lock, torch.inference_mode():
            return PreparedVoice(variant, conditionals_to_bytes(self.voices.get(voice)))

    def _conditionals(self, voice: VoiceAudio | PreparedVoice | None) -> VoiceConditionals:
        if voice is None:
            if self.builtin_voice is None:
                raise ValueError("this model has no built-in voice (its checkpoint has no conds.pt): "
                                 "give reference audio")
            return self.builtin_voice
        if isinstance(voice, PreparedVoice):
            if voice.variant != self.voice_variant:
                raise ValueError("the voice's stored conditionals were computed for another model variant")
            return conditionals_from_bytes(voice.data, self.device)
        return self.voices.get(voice)

    # ------------------------------------------------------------------------------------------------------------
    def synthesize(self, requests: Sequence[SynthesisRequest], on_audio: OnAudio | None = None
                   ) -> list[SynthesisResult]:
        """One result per request, in order. Requests with `stream=True` hand their audio to `on_audio` piece
        by piece as it is made (see the module docstring); without `on_audio` nothing streams."""
        with self._lock, torch.inference_mode():
            try:
                return self._synthesize(list(requests), on_audio)
            finally:
                with self._abort_lock:
                    self._aborted.clear()
                    self.decoder.clear_aborts()

    def abort(self, request_id: str) -> None:
        """Stop the request with this id in the batch `synthesize` is running (thread-safe, returns at once): T3
        drops it at its next decoding step, freeing its rows; S3Gen work not yet started for it is skipped; its
        result is the error "cancelled". Other requests are unaffected. An abort that arrives when no batch
        holds the id is forgotten when the current (or next) `synthesize` returns: the caller repeats it."""
        if not request_id:
            return
        with self._abort_lock:
            self._aborted.add(request_id)
            self.decoder.abort(request_id)

    def _is_aborted(self, request_id: str) -> bool:
        with self._abort_lock:
            return bool(request_id) and request_id in self._aborted

    def _new_decoder(self) -> None:
        """A fresh decoder (after a failed step: the old one's state is unknown), with the pending aborts."""
        decoder = T3Decoder(self.t3, max_rows=self.max_rows, chain=self.parts.chain)
        with self._abort_lock:
            for request_id in self._aborted:
                decoder.abort(request_id)
            self.decoder = decoder

    def _synthesize(self, requests: list[SynthesisRequest], on_audio: OnAudio | None = None
                    ) -> list[SynthesisResult]:
        errors: dict[int, str] = {}
        timings = {"conditioning_s": 0.0, "t3_s": 0.0, "s3gen_s": 0.0, "watermark_s": 0.0}
        started = t0 = time.perf_counter()
        chunks: list[_Chunk] = []
        for i, req in enumerate(requests):
            try:
                chunks.extend(self._plan(i, req))
            except Exception as e:   # a bad voice or text fails its own request only
                errors[i] = _reason(e)
        timings["conditioning_s"] = time.perf_counter() - t0

        streams: dict[int, _Stream] = {}
        if on_audio is not None:
            min_samples = int(MIN_PIECE_SECONDS * self.sample_rate)
            for i, req in enumerate(requests):
                if req.stream and i not in errors:
                    streams[i] = _Stream(req.request_id, sorted((c for c in chunks if c.request == i),
                                                                key=lambda c: c.index),
                                         CrossfadeStream(self.sample_rate, self.crossfade_seconds, min_samples))

        t0 = time.perf_counter()
        live = [c for c in chunks if c.request not in errors]
        if streams:
            self._decode_streaming(live, errors, streams, on_audio, timings, started)
            timings["t3_s"] = time.perf_counter() - t0 - timings["s3gen_s"] - timings["watermark_s"]
        else:
            for c, res in self._isolated(live, self._decode, errors):
                if res.stop_reason == "aborted":
                    errors[c.request] = CANCELLED
                else:
                    c.tokens = res.speech_tokens
            timings["t3_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, req in enumerate(requests):     # aborted after T3: no S3Gen work for it
            if i not in errors and self._is_aborted(req.request_id):
                errors[i] = CANCELLED
        live = [c for c in chunks if c.request not in errors and c.request not in streams
                and c.tokens is not None and c.tokens.numel() > 0]
        for c, wav in self._isolated(live, self._vocode, errors):
            c.wav = wav
        timings["s3gen_s"] += time.perf_counter() - t0

        results = []
        for i, req in enumerate(requests):
            if i in errors:
                results.append(SynthesisResult(error=errors[i]))
                continue
            mine = sorted((c for c in chunks if c.request == i), key=lambda c: c.index)
            extra = {}
            if i in streams:      # what was streamed is the audio (watermarked piece by piece)
                pieces = streams[i].pieces
                if not pieces:
                    results.append(SynthesisResult(error="the model produced no speech for this text"))
                    continue
                audio = np.concatenate(pieces)
                extra = {"stream_pieces": len(pieces), "first_audio_s": round(streams[i].first_audio_s or 0.0, 4)}
            else:
                clips = [c.wav for c in mine if c.wav is not None]
                if not clips:
                    results.append(SynthesisResult(error="the model produced no speech for this text"))
                    continue
                audio = crossfade_join(clips, self.sample_rate, self.crossfade_seconds)
                if self.watermarker is not None:
                    t1 = time.perf_counter()
                    audio = self.watermarker.apply(audio, self.sample_rate)
                    timings["watermark_s"] += time.perf_counter() - t1
            n_tokens = sum(int(c.tokens.numel()) for c in mine if c.tokens is not None)
            results.append(SynthesisResult(audio=audio, metrics={
                "audio_seconds": round(len(audio) / self.sample_rate, 3), "speech_tokens": n_tokens,
                "chunks": len(mine), "batch_size": len(requests), **extra,
                **{k: round(v, 4) for k, v in timings.items()}}))
        return results

    # --- streaming ----------------------------------------------------------------------------------------------
    def _decode_streaming(self, live: list[_Chunk], errors: dict[int, str], streams: dict[int, _Stream],
                          on_audio: OnAudio, timings: dict, started: float) -> None:
        """T3 over `live` step by step; after each step, the streamed requests' chunks that are next in line and
        decoded are vocoded and handed over (`_advance`). A failing step: the decoder is rebuilt and the chunks
        not yet decoded are decoded as the batch path does (request by request if need be); streams go on."""
        by_request = {id(c.t3): c for c in live}
        # chunk index first: every streamed request's first chunk is admitted in the first rows (the order changes
        # no request's tokens: each chunk draws from its own generator, alone or in any batch)
        for c in sorted(live, key=lambda c: (c.index, c.request)):
            self.decoder.submit(c.t3)
        try:
            while self.decoder.busy:
                finished = self.decoder.step()
                for res in finished:
                    c = by_request.get(id(res.request))
                    if c is not None and res.stop_reason == "aborted":
                        errors[c.request] = CANCELLED
                    elif c is not None:
                        c.tokens = res.speech_tokens
                for r in {by_request[id(res.request)].request for res in finished if id(res.request) in by_request}:
                    if r in streams and r not in errors:
                        self._advance(r, streams[r], errors, on_audio, timings, started)
        except Exception:
            log.exception("streamed decoding failed; decoding what is left request by request")
            self._new_decoder()
            left = [c for c in live if c.tokens is None and c.request not in errors]
            for c, res in self._isolated(left, self._decode, errors):
                c.tokens = res.speech_tokens
        for r, stream in streams.items():
            if r not in errors:
                self._advance(r, stream, errors, on_audio, timings, started)

    def _advance(self, r: int, stream: _Stream, errors: dict[int, str], on_audio: OnAudio, timings: dict,
                 started: float) -> None:
        """Vocode, join, watermark and hand over request r's next chunks while they are decoded, in order."""
        if self._is_aborted(stream.request_id):
            errors[r] = CANCELLED
            return
        n = len(stream.chunks)
        while stream.next < n and stream.chunks[stream.next].tokens is not None:
            c = stream.chunks[stream.next]
            last = stream.next == n - 1
            try:
                if c.tokens.numel() > 0:
                    t0 = time.perf_counter()
                    c.wav = self._s3gen([c])[0]
                    timings["s3gen_s"] += time.perf_counter() - t0
                piece = stream.joiner.push(c.wav if c.wav is not None else np.zeros(0, np.float32), last=last)
                stream.next += 1
                if len(piece):
                    if self.watermarker is not None:
                        t0 = time.perf_counter()
                        piece = self.watermarker.apply(piece, self.sample_rate)
                        timings["watermark_s"] += time.perf_counter() - t0
                    on_audio(stream.request_id, len(stream.pieces), piece)
                    stream.pieces.append(piece)
                    if stream.first_audio_s is None:
                        stream.first_audio_s = time.perf_counter() - started
            except Exception as e:     # its vocoding, or its consumer, failed: this request alone
                log.warning("streamed request %s failed: %s", stream.request_id, e)
                errors[r] = _reason(e)
                return

    def _plan(self, i: int, req: SynthesisRequest) -> list[_Chunk]:
        language = self.text.check_language(req.language)    # ValueError naming `language` if not spoken
        conds = self._conditionals(req.voice)
        pieces = split_text(req.text, self.max_chunk_chars) or [""]
        out = []
        for k, piece in enumerate(pieces):
            ids = self.text.encode(self.text.normalize(piece), language)
            seed = chunk_seed(req.params.seed, k)
            cap = min(self.max_new_tokens, self.t3.max_new_tokens_for(len(ids), conds.t3_prompt_tokens.shape[-1]))
            t3_req = T3Request(text_ids=ids, speaker_emb=conds.speaker_emb, prompt_tokens=conds.t3_prompt_tokens,
                               params=dataclasses.replace(req.params, seed=seed),
                               max_new_tokens=max_speech_tokens(len(ids), cap=cap), request_id=req.request_id)
            self.decoder.validate(t3_req)
            out.append(_Chunk(i, k, t3_req, conds, seed))
        return out

    def _decode(self, chunks: list[_Chunk]):
        try:
            return self.decoder.run([c.t3 for c in chunks])
        except Exception:
            self._new_decoder()   # state unknown now
            raise

    def _vocode(self, chunks: list[_Chunk]) -> list[np.ndarray]:
        """Waveforms of the chunks, in order: S3Gen over all of them at once, or (`s3gen_per_request`) over each
        request's chunks at a time, so that no request's numbers depend on what else is in the batch."""
        if not self.s3gen_per_request:
            return self._s3gen(chunks)
        wavs: dict[int, np.ndarray] = {}
        for r in dict.fromkeys(c.request for c in chunks):
            mine = [c for c in chunks if c.request == r]
            wavs.update(zip(map(id, mine), self._s3gen(mine)))
        return [wavs[id(c)] for c in chunks]

    def _speech_item(self, c: _Chunk) -> SpeechItem:
        # the variant's suffix (Turbo: three silence tokens) after each chunk's tokens, as the official code does
        return SpeechItem.from_conditionals(torch.cat([c.tokens.cpu(), self._suffix]), c.conds)

    def s3gen_groups(self, chunks: list[_Chunk]) -> list[list[_Chunk]]:
        """The flow calls `_s3gen(chunks)` makes, as lists of chunks: each group is one unit of S3Gen work (flow,
        then vocoder, for those chunks only), so running the groups one by one gives the very same audio."""
        groups = flow_groups([self._speech_item(c) for c in chunks], max_batch=self.max_flow_batch)
        return [[chunks[i] for i in g] for g in groups]

    def _s3gen(self, chunks: list[_Chunk]) -> list[np.ndarray]:
        """Waveforms of the chunks, in order: flow and vocoder one flow group at a time (`s3gen_groups`)."""
        return run_steps(self.s3gen_steps(chunks))

    def s3gen_steps(self, chunks: list[_Chunk]) -> Generator[None, None, list[np.ndarray]]:
        """`_s3gen` as a generator that pauses between the flow's steps and before each vocoder call, and returns
        the waveforms: the engine core runs a request's vocoding one step at a time (the same operations in the
        same order, so the same samples)."""
        wavs: dict[int, np.ndarray] = {}
        for group in self.s3gen_groups(chunks):
            gens = [torch.Generator(device=self.device).manual_seed(c.seed) for c in group]
            mels = yield from tokens_to_mel_steps(self.s3gen, [self._speech_item(c) for c in group],
                                                  generators=gens, max_batch=self.max_flow_batch)
            yield
            for c, w in zip(group, mel_to_wav(self.s3gen, mels, generators=gens)):
                wavs[id(c)] = w.float().cpu().numpy()
        return [wavs[id(c)] for c in chunks]

    @staticmethod
    def _isolated(chunks: list[_Chunk], stage: Callable[[list[_Chunk]], Sequence[T]], errors: dict[int, str]):
        """Run a batched stage; if it fails, run each request's chunks alone so only the culprit fails."""
        if not chunks:
            return []
        try:
            return list(zip(chunks, stage(chunks)))
        except Exception:
            log.exception("batched stage failed; retrying request by request")
        done = []
        for r in sorted({c.request for c in chunks}):
            mine = [c for c in chunks if c.request == r]
            try:
                done.extend(zip(mine, stage(mine)))
            except Exception as e:
                errors[r] = _reason(e)
        return done


def _reason(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg if isinstance(e, ValueError) else f"inference error: {type(e).__name__}: {msg}"


def load_engine(model: str, data_dir: str | Path | None = None, device: str | None = None,
                dtype: str | None = None, watermark: bool = True, **options) -> ChatterboxEngine:
    """Resolve `model` (a --model spec: engine/catalog.py, engine/resolve.py) and load the engine of its variant on
    `device`: ChatterboxEngine for the text-to-speech variants, VoiceConversionEngine for `vc`."""
    from .catalog import variant_of_spec
    from .resolve import resolve_checkpoint
    path = resolve_checkpoint(model, data_dir)
    if variant_of_spec(model) == "vc":     # S3Gen alone: the voice-conversion engine (engine/vc.py)
        from .vc import load_vc_engine
        return load_vc_engine(path, device=device, dtype=dtype, watermark=watermark, **options)
    return ChatterboxEngine(path, device=device, dtype=dtype, watermark=watermark, **options)
