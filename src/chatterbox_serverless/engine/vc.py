"""Voice conversion (Chatterbox VC): say a source recording again in a target voice, with S3Gen alone.

What the official `ChatterboxVC` (chatterbox-tts 0.1.7, vc.py) computes, and how this engine does it:

    source speech ─► 16 kHz (soxr HQ, as librosa.load) ─► S3 tokens (S3Gen's tokenizer, 25 per second)
                  ─► S3Gen flow (10-step CFG) conditioned on the TARGET voice ─► mel ─► HiFT ─► fade-in ─► Perth

    target voice  = S3Gen's part of a voice's conditionals only (no T3, no voice encoder): the prompt mel and S3
                    prompt tokens of its first 10 s at 24 kHz, and its CAMPPlus x-vector (`TargetFrontEnd`, the
                    same steps as conditioning.VoiceFrontEnd's S3Gen part); without a target, the checkpoint's
                    conds.pt `gen` part.

There is no text and no autoregressive model, so one request is one S3Gen call: the converted audio has exactly
the source's length in tokens (40 ms each: 960 samples at 24 kHz per token). Requests of a batch go through the
engine's batched S3Gen (speech_to_wav.tokens_to_mel / mel_to_wav) one request at a time on CPU (bit-identical
alone or batched, as ChatterboxEngine does by default) and all together on CUDA (within
speech_to_wav.CUDA_BATCH_ATOL). Randomness: the flow noise and the vocoder's excitation come from one generator
seeded with the request's `params.seed`, in the official order, so the same seed gives the same audio, and seed s
reproduces the official `ChatterboxVC.generate` run after `torch.manual_seed(s)`. Only `params.seed` is used (the
other sampling parameters are T3's). The source is tokenised one request at a time (batched tokenising pads the
mel and could move a token). `stream` is ignored: the audio comes whole.

Bounds (the official has none; these keep S3Gen's work within what the TTS engine does per chunk): the source
must hold at least MIN_SOURCE_SECONDS (0.5 s, about 12 tokens) and at most MAX_SOURCE_SECONDS (40 s = 1000
tokens, the official TTS bound per chunk) of audio; the target clip follows the reference-audio rules of
conditioning.py (at least 0.5 s, not silent; only its first 10 s are used, as the official does).

Library voices (contract.VoicePreparer): `prepare_voice` serialises the target's S3Gen conditionals (format
`chatterbox-vc-target/1`), tagged with a hash of the tokenizer and speaker encoder that computed them; a TTS
engine's prepared voice (which also holds T3's part, from other networks) is refused, and the other way round.

Checkpoints: a directory with `s3gen.safetensors` (loaded strictly, as the TTS engine loads it) and optionally
`conds.pt` (the default target: its `gen` part, in the VC layout {'gen': ...} or the original's {'t3', 'gen'}),
so the original model's directory serves VC as well. `make_tiny_vc` writes a tiny random one for tests.
`parity_outputs` / `run_vc_parity` compare every tensor of a `dump_reference.py --model vc` dump.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TextIO, TypeVar

import numpy as np
import torch

from . import audio
from .checkpoint import CheckpointError, read_config, read_torch
from .conditioning import MIN_SECONDS, S3GEN_PROMPT_SECONDS, SILENCE_LEVEL, VoiceCache
from .contract import OnAudio, PreparedVoice, SynthesisRequest, SynthesisResult, VoiceAudio
from .models.campplus import CAMPPlus
from .models.s3gen import S3Gen
from .models.s3tokenizer import S3TokenizerV2
from .speech_to_wav import SpeechItem, mel_to_wav, tokens_to_mel

log = logging.getLogger(__name__)
T = TypeVar("T")

VC_MODEL = "chatterbox-vc"            # the API model it serves (catalog.API_MODELS["vc"])
S3GEN_FILE = "s3gen.safetensors"
CONDS_FILE = "conds.pt"
T3_FILES = ("t3_cfg.safetensors", "t3_turbo_v1.safetensors", "t3_mtl23ls_v2.safetensors")
MIN_SOURCE_SECONDS = 0.5
MAX_SOURCE_SECONDS = 40.0
TARGET_FORMAT = "chatterbox-vc-target/1"
CANCELLED = "cancelled"               # as pipeline.CANCELLED: the error of an aborted request


# ------------------------------------------------------------------------------------------------ target voice

@dataclasses.dataclass
class TargetVoice:
    """S3Gen's conditioning by a voice (the `gen` part of the official conditionals)."""
    prompt_token: torch.Tensor    # (1, T) int64, S3 tokens of the first 10 s
    prompt_feat: torch.Tensor     # (1, 2T[+1], 80) float32, log-mel of the first 10 s at 24 kHz
    embedding: torch.Tensor       # (1, 192) float32, CAMPPlus x-vector

    def to(self, device: torch.device | str) -> "TargetVoice":
        return TargetVoice(self.prompt_token.to(device), self.prompt_feat.to(device), self.embedding.to(device))

    def item(self, tokens: torch.Tensor) -> SpeechItem:
        return SpeechItem(tokens, self.prompt_token, self.prompt_feat, self.embedding)


def _check_target(target: TargetVoice, what: str) -> TargetVoice:
    n = target.prompt_token.shape[-1]
    if target.prompt_token.dim() != 2 or target.prompt_feat.dim() != 3 or target.prompt_feat.shape[1] not in (2 * n, 2 * n + 1):
        raise CheckpointError(f"{what}: prompt_feat {tuple(target.prompt_feat.shape)} does not match prompt_token "
                              f"{tuple(target.prompt_token.shape)} (needs 2 mel frames per token)")
    return target


def load_target_voice(path: str | Path, device: torch.device | str = "cpu") -> TargetVoice:
    """The `gen` part of a conds.pt (the VC layout {'gen': ref dict} or the original's {'t3': ..., 'gen': ...}),
    read with weights_only loading; CheckpointError naming the file otherwise."""
    data = read_torch(path)
    try:
        gen = data["gen"]
        target = TargetVoice(torch.atleast_2d(gen["prompt_token"]).long(), gen["prompt_feat"].float(),
                             gen["embedding"].float().reshape(1, -1))
    except Exception as e:  # noqa: BLE001 - not a dict, keys missing, not tensors
        raise CheckpointError(f"{path} is not a Chatterbox conds.pt with a 'gen' part ({type(e).__name__}: {e})"
                              ) from None
    return _check_target(target, str(path)).to(device)


def save_target_voice(target: TargetVoice, path: str | Path) -> None:
    """`target` as an official VC conds.pt ({'gen': S3Gen ref dict}, what ChatterboxVC.from_local reads)."""
    t = target.to("cpu")
    gen = dict(prompt_token=t.prompt_token, prompt_token_len=torch.tensor([t.prompt_token.shape[1]]),
               prompt_feat=t.prompt_feat, prompt_feat_len=None, embedding=t.embedding)
    torch.save(dict(gen=gen), str(path))


def target_to_bytes(target: TargetVoice) -> bytes:
    from safetensors.torch import save
    t = target.to("cpu")
    return save({"format": torch.frombuffer(bytearray(TARGET_FORMAT.encode()), dtype=torch.uint8),
                 "prompt_token": t.prompt_token.contiguous(), "prompt_feat": t.prompt_feat.contiguous(),
                 "embedding": t.embedding.contiguous()})


def target_from_bytes(data: bytes, device: torch.device | str = "cpu") -> TargetVoice:
    """The TargetVoice `target_to_bytes` wrote; ValueError for anything else."""
    from safetensors.torch import load
    try:
        tensors = load(bytes(data))
        fmt = bytes(tensors["format"].numpy()).decode()
        if fmt != TARGET_FORMAT:
            raise ValueError(f"format {fmt!r}")
        target = _check_target(TargetVoice(tensors["prompt_token"], tensors["prompt_feat"], tensors["embedding"]),
                               "stored target voice")
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, other keys
        raise ValueError(f"stored voice conditionals are unreadable ({type(e).__name__}: {e})") from None
    return target.to(device)


def _mono(samples: np.ndarray, name: str) -> np.ndarray:
    """Mono float32 samples ((frames, channels) averaged, as librosa.load does); ValueError naming `name`."""
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.astype(np.float32).mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"{name} must be mono samples, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return x


class TargetFrontEnd:
    """A target clip -> TargetVoice, as the official `ChatterboxVC.set_target_voice` computes it: the clip at
    24 kHz (soxr HQ), its first 10 s, then `S3Gen.embed_ref` (prompt mel at 24 kHz; the torchaudio-style sinc
    resampler to 16 kHz for the x-vector and the prompt tokens, cut to half the mel frames). These are the very
    steps of conditioning.VoiceFrontEnd's S3Gen part (tests/unit/engine/test_voice_conversion.py checks they agree),
    with its rules for a usable clip (at least 0.5 s, not silent)."""

    def __init__(self, tokenizer: S3TokenizerV2, speaker_encoder: CAMPPlus):
        self.tokenizer, self.speaker_encoder = tokenizer, speaker_encoder

    @property
    def device(self) -> torch.device:
        return self.tokenizer.encoder.conv1.weight.device

    @torch.inference_mode()
    def compute(self, samples: np.ndarray, sample_rate: int) -> TargetVoice:
        if sample_rate <= 0:
            raise ValueError(f"invalid sample rate {sample_rate}")
        x = _mono(samples, "reference audio")
        if x.shape[0] < MIN_SECONDS * sample_rate:
            raise ValueError(f"reference audio is too short ({x.shape[0] / sample_rate:.2f} s); "
                             f"give at least {MIN_SECONDS} s (ideally 6-10 s) of the target voice")
        if not (np.abs(x) > SILENCE_LEVEL).any():
            raise ValueError("reference audio is silent")
        wav24 = audio.soxr_resample(x, int(sample_rate), audio.S3GEN_SR)[:S3GEN_PROMPT_SECONDS * audio.S3GEN_SR]
        gen24 = torch.from_numpy(np.ascontiguousarray(wav24)).to(self.device)[None]
        prompt_feat = audio.s3gen_prompt_mel(gen24).transpose(1, 2)
        gen16 = audio.sinc_resample(gen24, audio.S3GEN_SR, audio.S3_SR)[0]
        embedding = self.speaker_encoder.embed(gen16)
        prompt_token, _ = self.tokenizer.tokenize([gen16])
        prompt_token = prompt_token[:, :prompt_feat.shape[1] // 2]
        if not torch.isfinite(embedding).all():
            raise ValueError("reference audio gives no usable speaker embedding (is it speech?)")
        return TargetVoice(prompt_token.long(), prompt_feat.float(), embedding.float().reshape(1, -1))

    def fingerprint(self) -> str:
        """A content hash of the networks and the format: equal fingerprints compute equal targets."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{TARGET_FORMAT}:{S3GEN_PROMPT_SECONDS}".encode())
        for part, module in (("tok", self.tokenizer), ("spk", self.speaker_encoder)):
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def source_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """The source as the official hands it to the S3 tokenizer: mono, at 16 kHz (librosa.load: soxr HQ)."""
    if sample_rate <= 0:
        raise ValueError(f"source: invalid sample rate {sample_rate}")
    return audio.soxr_resample(_mono(samples, "source audio"), int(sample_rate), audio.S3_SR)


def source_tokens(tokenizer: S3TokenizerV2, source16: np.ndarray) -> torch.Tensor:
    """(N,) int64 S3 tokens of a 16 kHz source (all of them: the official passes no max_len)."""
    codes, lens = tokenizer.tokenize([torch.from_numpy(np.ascontiguousarray(source16)).to(
        tokenizer.encoder.conv1.weight.device)])
    return codes[0, :int(lens[0])].long()


# ------------------------------------------------------------------------------------------------- checkpoints

def is_vc_checkpoint(ckpt_dir: str | Path) -> bool:
    """A directory with s3gen.safetensors and no T3 file: the VC layout (the original model's directory also
    serves VC, but is recognised as the original)."""
    d = Path(ckpt_dir)
    return (d / S3GEN_FILE).is_file() and not any((d / f).is_file() for f in T3_FILES)


def load_s3gen(ckpt_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> S3Gen:
    """The directory's s3gen.safetensors, loaded strictly with the original model's flow (10-step CFG)."""
    from .variants import ORIGINAL
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / S3GEN_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir / S3GEN_FILE} is missing: a Chatterbox VC checkpoint needs {S3GEN_FILE} "
                              f"(and optionally {CONDS_FILE}, the default target voice).")
    config = ORIGINAL.architecture(read_config(ckpt_dir))
    return S3Gen.from_checkpoint(ckpt_dir, device=device, dtype=dtype, config=config, filename=S3GEN_FILE)


def make_tiny_vc(target: str | Path, seed: int = 0) -> Path:
    """Write a tiny random VC checkpoint to `target` (atomically): s3gen.safetensors of S3GenConfig.tiny(), its
    sizes in serverless_config.json, and conds.pt holding the target of a synthetic voice (official VC layout)."""
    from safetensors.torch import save_file
    from .checkpoint import CONFIG_FILE
    from .models.s3gen import S3GenConfig
    from .tiny import synthetic_voice
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-vc-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = S3GenConfig.tiny()
            s3gen = S3Gen(cfg).eval()
        save_file({k: v.detach().contiguous() for k, v in s3gen.state_dict().items()}, str(tmp / S3GEN_FILE))
        config = {"s3tokenizer": cfg.tokenizer, "campplus": cfg.speaker_encoder, "flow": cfg.flow, "hift": cfg.mel2wav}
        (tmp / CONFIG_FILE).write_text(json.dumps({k: dataclasses.asdict(v) for k, v in config.items()}, indent=1))
        loaded = load_s3gen(tmp)
        front_end = TargetFrontEnd(loaded.tokenizer, loaded.speaker_encoder)
        save_target_voice(front_end.compute(synthetic_voice(seconds=4.0, seed=seed), audio.S3GEN_SR), tmp / CONDS_FILE)
        try:
            tmp.rename(target)
        except OSError:                 # another process finished first: keep theirs
            if not (target / CONDS_FILE).is_file():
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ engine

@dataclasses.dataclass
class _Job:
    request: int                   # index in the batch
    request_id: str
    item: SpeechItem
    seed: int
    source_seconds: float
    wav: np.ndarray | None = None


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _reason(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg if isinstance(e, ValueError) else f"inference error: {type(e).__name__}: {msg}"


class VoiceConversionEngine:
    """Chatterbox VC loaded once, serving batches (contract.Engine; contract.VoicePreparer for library voices).
    `synthesize` is serialised by a lock, as ChatterboxEngine's is."""

    model = VC_MODEL

    def __init__(self, ckpt_dir: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, watermark: bool = True, voice_cache_size: int = 64,
                 max_flow_batch: int | None | str = "auto", flow_attention: str = "auto",
                 s3gen_per_request: bool | str = "auto", min_source_seconds: float = MIN_SOURCE_SECONDS,
                 max_source_seconds: float = MAX_SOURCE_SECONDS):
        """`ckpt_dir`: s3gen.safetensors and optionally conds.pt (without it every request must bring a target
        voice). `dtype`: the flow's (float32 by default: parity; the tokenizer, speaker encoder and vocoder stay
        float32). `max_flow_batch`, `flow_attention`, `s3gen_per_request`: as ChatterboxEngine's (on CPU one
        request at a time, at most 2 flow rows per call; on CUDA all requests together)."""
        ckpt_dir = Path(ckpt_dir)
        self.device = _pick_device(device)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        dtype = dtype or torch.float32
        if dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("float16 is for CUDA; on the CPU use float32 (exact) or bfloat16")
        if not 0 < min_source_seconds <= max_source_seconds:
            raise ValueError(f"min_source_seconds ({min_source_seconds}) must be > 0 and <= max_source_seconds "
                             f"({max_source_seconds})")
        self.dtype = dtype
        self.s3gen = load_s3gen(ckpt_dir, self.device, dtype)
        conds = ckpt_dir / CONDS_FILE
        self.builtin_voice = load_target_voice(conds, self.device) if conds.is_file() else None
        estimator = self.s3gen.flow.decoder.estimator
        if flow_attention == "auto":
            from .models.flow_decoder import pick_attention
            c = estimator.config
            flow_attention = pick_attention(c.num_heads, c.attention_head_dim, self.device, dtype)
        estimator.attention = flow_attention
        self.front_end = TargetFrontEnd(self.s3gen.tokenizer, self.s3gen.speaker_encoder)
        self.voices = VoiceCache(self.front_end, max_entries=voice_cache_size)   # duck-typed: .compute(samples, sr)
        self.sample_rate = self.s3gen.sample_rate
        self.watermarker = None
        if watermark:
            from .watermark import Watermarker
            self.watermarker = Watermarker(device=self.device)
        self.max_flow_batch = (2 if self.device.type == "cpu" else None) if max_flow_batch == "auto" else max_flow_batch
        self.s3gen_per_request = self.device.type == "cpu" if s3gen_per_request == "auto" else bool(s3gen_per_request)
        self.min_source_seconds, self.max_source_seconds = float(min_source_seconds), float(max_source_seconds)
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._abort_lock = threading.Lock()

    # --- library voices (contract.VoicePreparer) ----------------------------------------------------------------
    @property
    def voice_variant(self) -> str:
        variant = getattr(self, "_voice_variant", None)
        if variant is None:
            variant = self._voice_variant = "chatterbox:vc:" + self.front_end.fingerprint()
        return variant

    def prepare_voice(self, voice: VoiceAudio) -> PreparedVoice:
        """The clip's target conditionals, serialised: the very ones a request with this clip as `voice` uses."""
        with self._lock, torch.inference_mode():
            return PreparedVoice(self.voice_variant, target_to_bytes(self.voices.get(voice)))

    def _target(self, voice: VoiceAudio | PreparedVoice | None) -> TargetVoice:
        if voice is None:
            if self.builtin_voice is None:
                raise ValueError("voice: this model has no default target voice (its checkpoint has no conds.pt): "
                                 "give reference audio of the voice to convert to")
            return self.builtin_voice
        if isinstance(voice, PreparedVoice):
            if voice.variant != self.voice_variant:
                raise ValueError("the voice's stored conditionals were computed for another model variant")
            return target_from_bytes(voice.data, self.device)
        return self.voices.get(voice)

    # --- synthesis ----------------------------------------------------------------------------------------------
    def synthesize(self, requests: Sequence[SynthesisRequest], on_audio: OnAudio | None = None
                   ) -> list[SynthesisResult]:
        """One result per request, in order: each request's `source` said again in its `voice` (None: the
        checkpoint's default target). `on_audio` is not called: the audio comes whole."""
        with self._lock, torch.inference_mode():
            try:
                return self._synthesize(list(requests))
            finally:
                with self._abort_lock:
                    self._aborted.clear()

    def abort(self, request_id: str) -> None:
        """Stop the request with this id in the running batch before its S3Gen work starts (thread-safe, returns at
        once); its result is the error "cancelled". A request whose flow is running finishes it."""
        if request_id:
            with self._abort_lock:
                self._aborted.add(request_id)

    def _is_aborted(self, request_id: str) -> bool:
        with self._abort_lock:
            return bool(request_id) and request_id in self._aborted

    def _plan(self, i: int, req: SynthesisRequest) -> _Job:
        src = req.source
        if src is None:
            raise ValueError("source: voice conversion needs the speech to convert (source audio)")
        if not isinstance(src, VoiceAudio):
            raise ValueError(f"source: expected decoded audio (VoiceAudio), got {type(src).__name__}")
        if src.sample_rate <= 0:
            raise ValueError(f"source: invalid sample rate {src.sample_rate}")
        seconds = len(np.asarray(src.samples)) / src.sample_rate
        if seconds < self.min_source_seconds:
            raise ValueError(f"source audio is too short ({seconds:.2f} s); give at least "
                             f"{self.min_source_seconds:g} s of speech")
        if seconds > self.max_source_seconds:
            raise ValueError(f"source audio is too long ({seconds:.1f} s); this model converts at most "
                             f"{self.max_source_seconds:g} s at once")
        target = self._target(req.voice)
        tokens = source_tokens(self.s3gen.tokenizer, source_to_16k(src.samples, src.sample_rate))
        if tokens.numel() == 0:
            raise ValueError("source audio gives no speech tokens")
        return _Job(i, req.request_id, target.item(tokens), int(req.params.seed), seconds)

    def _synthesize(self, requests: list[SynthesisRequest]) -> list[SynthesisResult]:
        errors: dict[int, str] = {}
        timings = {"conditioning_s": 0.0, "s3gen_s": 0.0, "watermark_s": 0.0}
        t0 = time.perf_counter()
        jobs: list[_Job] = []
        for i, req in enumerate(requests):
            try:
                jobs.append(self._plan(i, req))
            except Exception as e:   # a bad source or voice fails its own request only
                errors[i] = _reason(e)
        timings["conditioning_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        live = [j for j in jobs if j.request not in errors]
        if self.s3gen_per_request:     # one request at a time: its audio is the same alone or in any batch
            for job in live:
                if self._is_aborted(job.request_id):
                    errors[job.request] = CANCELLED
                    continue
                try:
                    job.wav = self._s3gen([job])[0]
                except Exception as e:  # noqa: BLE001 - reported in its own result
                    log.warning("voice conversion of request %s failed: %s", job.request_id, e)
                    errors[job.request] = _reason(e)
        else:
            for job in live:
                if self._is_aborted(job.request_id):
                    errors[job.request] = CANCELLED
            for job, wav in _isolated([j for j in live if j.request not in errors], self._s3gen, errors):
                job.wav = wav
        timings["s3gen_s"] = time.perf_counter() - t0

        by_request = {j.request: j for j in jobs}
        results = []
        for i in range(len(requests)):
            job = by_request.get(i)
            if i in errors or job is None or job.wav is None:
                results.append(SynthesisResult(error=errors.get(i, "the model produced no audio")))
                continue
            wav = job.wav
            if self.watermarker is not None:
                t1 = time.perf_counter()
                wav = self.watermarker.apply(wav, self.sample_rate)
                timings["watermark_s"] += time.perf_counter() - t1
            results.append(SynthesisResult(audio=wav, metrics={
                "audio_seconds": round(len(wav) / self.sample_rate, 3), "source_seconds": round(job.source_seconds, 3),
                "speech_tokens": int(job.item.tokens.numel()), "batch_size": len(requests),
                **{k: round(v, 4) for k, v in timings.items()}}))
        return results

    def _s3gen(self, jobs: list[_Job]) -> list[np.ndarray]:
        gens = [torch.Generator(device=self.device).manual_seed(j.seed) for j in jobs]
        mels = tokens_to_mel(self.s3gen, [j.item for j in jobs], generators=gens, max_batch=self.max_flow_batch)
        return [w.float().cpu().numpy() for w in mel_to_wav(self.s3gen, mels, generators=gens)]


def _isolated(jobs: list[_Job], stage: Callable[[list[_Job]], Sequence[T]], errors: dict[int, str]
              ) -> list[tuple[_Job, T]]:
    """Run a batched stage; if it fails, run each request alone so only the culprit fails."""
    if not jobs:
        return []
    try:
        return list(zip(jobs, stage(jobs)))
    except Exception:  # noqa: BLE001
        log.exception("batched voice conversion failed; retrying request by request")
    done = []
    for j in jobs:
        try:
            done.extend(zip([j], stage([j])))
        except Exception as e:  # noqa: BLE001 - reported in its own result
            errors[j.request] = _reason(e)
    return done


# ChatterboxEngine's options that concern T3 or text chunks: a VC engine has neither, and ignores them
TTS_ONLY_OPTIONS = frozenset({"max_chunk_chars", "max_rows", "crossfade_seconds", "compile"})


def load_vc_engine(ckpt_dir: str | Path, device: str | None = None, dtype: str | None = None,
                   watermark: bool = True, **options) -> VoiceConversionEngine:
    """The VC engine of a checkpoint directory (s3gen.safetensors [+ conds.pt]; the original model's directory
    serves too). `options`: VoiceConversionEngine's keyword arguments; ChatterboxEngine's T3/text options
    (TTS_ONLY_OPTIONS) are accepted and ignored, so one set of engine options serves every model; any other
    unknown option is a TypeError."""
    ignored = sorted(k for k in options if k in TTS_ONLY_OPTIONS)
    if ignored:
        log.debug("voice conversion ignores the text-to-speech options %s", ", ".join(ignored))
    return VoiceConversionEngine(ckpt_dir, device=device, dtype=dtype, watermark=watermark,
                                 **{k: v for k, v in options.items() if k not in TTS_ONLY_OPTIONS})


# ------------------------------------------------------------------------------------------------------ parity

def parity_outputs(ckpt_dir: Path, ref: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """This engine's versions of every tensor a `dump_reference.py --model vc` dump records: `cond.gen_*` from
    reference_voice.wav (TargetFrontEnd), `vc.source_16k` and `flow.tokens` from source_voice.wav, then flow,
    vocoder and watermark fed the recorded tokens, target, noise and excitation (as speech_to_wav.parity_outputs).
    Also `engine.watermarked`: the whole engine (`synthesize`, target = the dump's conds.pt, seed =
    sample_seed + 1 as the dump seeds the flow) against the recorded out.watermarked."""
    import soundfile as sf
    from .watermark import Watermarker
    ckpt_dir = Path(ckpt_dir)
    s3gen = load_s3gen(ckpt_dir)
    front_end = TargetFrontEnd(s3gen.tokenizer, s3gen.speaker_encoder)
    voice, sr = sf.read(str(ckpt_dir / "reference_voice.wav"), dtype="float32")
    target = front_end.compute(voice, sr)
    out: dict[str, torch.Tensor] = {"cond.gen_prompt_token": target.prompt_token,
                                    "cond.gen_prompt_feat": target.prompt_feat, "cond.gen_embedding": target.embedding}
    source, src_sr = sf.read(str(ckpt_dir / "source_voice.wav"), dtype="float32")
    source16 = source_to_16k(source, src_sr)
    out["vc.source_16k"] = torch.from_numpy(source16)[None]
    out["flow.tokens"] = source_tokens(s3gen.tokenizer, source16)

    recorded = TargetVoice(ref["cond.gen_prompt_token"], ref["cond.gen_prompt_feat"], ref["cond.gen_embedding"])
    out["flow.mel"] = tokens_to_mel(s3gen, [recorded.item(ref["flow.tokens"])], noises=[ref["flow.noise"]])[0][None]
    mel, excitation = ref["flow.mel"], ref["hift.source"]
    out["hift.f0"] = s3gen.mel2wav.f0_predictor(mel)
    out["hift.wav"] = s3gen.mel2wav.decode(mel, excitation)
    out["out.wav"] = mel_to_wav(s3gen, [mel[0]], sources=[excitation])[0][None]
    watermarker = Watermarker()
    out["out.watermarked"] = torch.from_numpy(watermarker.apply(out["out.wav"][0].cpu().numpy(), s3gen.sample_rate))

    engine = VoiceConversionEngine(ckpt_dir, device="cpu", watermark=False)
    engine.watermarker = watermarker
    from .contract import SynthesisParams
    seed = int(meta.get("sample_seed", 1)) + 1
    (res,) = engine.synthesize([SynthesisRequest(text="", source=VoiceAudio(source, src_sr),
                                                 params=SynthesisParams(seed=seed))])
    if res.error:
        raise RuntimeError(f"the engine failed on the dump's source: {res.error}")
    out["engine.watermarked"] = torch.from_numpy(res.audio)
    return out


ENGINE_ROWS = {"engine.watermarked": "out.watermarked"}    # our extra end-to-end rows -> the tensor they match


@dataclasses.dataclass
class ParityRow:
    name: str
    shape: tuple
    max_abs: float
    rel: float
    ok: bool
    integer: bool


@dataclasses.dataclass
class VCParityReport:
    ok: bool
    rows: list[ParityRow]
    notes: list[str]

    def format(self) -> str:
        lines = [f"{'tensor':<24} {'shape':<18} {'max abs err':>12} {'rel err':>10}  result"]
        for r in self.rows:
            kind = ("identical" if r.ok else f"{int(r.max_abs)} differ") if r.integer else f"{r.rel:10.2e}"
            lines.append(f"{r.name:<24} {str(r.shape):<18} {r.max_abs:12.3e} {kind:>10}  {'ok' if r.ok else 'FAIL'}")
        return "\n".join(lines + self.notes + ["PARITY OK" if self.ok else "PARITY FAILED"])


def run_vc_parity(dump_dir: str | Path, out: TextIO | None = sys.stdout) -> VCParityReport:
    """Compare this engine with a `dump_reference.py --model vc` dump (parity.compare: relative error = max |ours -
    theirs| / max |theirs|, REL_TOL; token ids identical). Every recorded tensor is compared except the recorded
    randomness fed in (flow.noise, hift.source); flow.tokens is compared (here the tokenizer's output). Printed to
    `out` (None: not printed) in `chatterbox-serverless parity`'s format."""
    from .parity import compare, read_dump
    dump_dir = Path(dump_dir)
    ref, meta = read_dump(dump_dir)
    notes = []
    if meta.get("model") != "vc":
        notes.append(f"reference.json says model {meta.get('model')!r}, not 'vc'")
    if out is not None:
        print(f"variant: vc (reference.json: {meta.get('model')}, {meta.get('package', 'package unknown')})", file=out)
    with torch.inference_mode():
        ours = parity_outputs(dump_dir, ref, meta)
    rows = []
    for name in [k for k in ref if k not in ("flow.noise", "hift.source")] + list(ENGINE_ROWS):
        theirs = ref[ENGINE_ROWS.get(name, name)]
        if name not in ours:
            rows.append(ParityRow(name, tuple(theirs.shape), float("inf"), float("inf"), False, False))
            continue
        diff, rel, good = compare(ours[name].detach().cpu(), theirs)
        rows.append(ParityRow(name, tuple(theirs.shape), diff, rel, good, not theirs.is_floating_point()))
    report = VCParityReport(all(r.ok for r in rows) and not notes, rows, notes)
    if out is not None:
        print(report.format(), file=out)
    return report
