"""Voice conditioning: everything T3 and S3Gen need from a reference clip, computed as the official
`ChatterboxTTS.prepare_conditionals` does, cached per voice, and the built-in voice file (conds.pt).

Official pipeline (chatterbox-tts 0.1.7), reproduced step by step in `VoiceFrontEnd.compute`:
  1. the clip at 24 kHz (librosa.load: soxr HQ when the rate differs); `ref16` = the FULL clip to 16 kHz (soxr HQ)
  2. S3Gen reference from the first 10 s at 24 kHz: prompt mel (50 frames/s); the same 10 s resampled to 16 kHz
     by the OTHER resampler (torchaudio's sinc) -> CAMPPlus x-vector and S3 prompt tokens (cut so 2*T = mel frames)
  3. T3 prompt: S3 tokens of ref16[:6 s], at most 150
  4. VE speaker embedding of the full ref16, silence-trimmed
Turbo (`ChatterboxTurboTTS.prepare_conditionals`) differs only in its `VoiceSettings`: the 24 kHz clip must be
longer than 5 s, is scaled to -27 LUFS (pyloudnorm's meter: audio.integrated_loudness) before anything else, and
the T3 prompt is the S3 tokens of its first 15 s, at most 375.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import audio
from .checkpoint import CheckpointError, config_from_state_dict, load_strict, read_config, read_torch, read_weights
from .models.campplus import CAMPPlus, CAMPPlusConfig
from .models.s3tokenizer import S3TokenizerConfig, S3TokenizerV2
from .models.voice_encoder import VoiceEncoder, VoiceEncoderConfig
from .contract import VoiceAudio

S3GEN_PROMPT_SECONDS = 10   # S3Gen reference: first 10 s at 24 kHz
T3_PROMPT_SECONDS = 6       # T3 speech prompt: first 6 s at 16 kHz
T3_PROMPT_TOKENS = 150
MIN_SECONDS = 0.5           # shorter clips cannot be embedded meaningfully (the official code crashes or worse)
SILENCE_LEVEL = 1e-5        # a clip with no sample above this (-100 dBFS) is silence: its embeddings would be NaN


@dataclass(frozen=True)
class VoiceSettings:
    """How a variant turns a reference clip into conditionals (engine/variants.py holds each variant's); the
    defaults are the original model's."""
    t3_prompt_seconds: float = T3_PROMPT_SECONDS   # T3 speech prompt: the first seconds of the 16 kHz clip
    t3_prompt_tokens: int = T3_PROMPT_TOKENS       # ... at most this many S3 tokens
    longer_than_seconds: float | None = None       # the 24 kHz clip must be strictly longer (Turbo: 5)
    loudness_lufs: float | None = None             # scale the 24 kHz clip to this integrated loudness first (Turbo: -27)


@dataclass
class VoiceConditionals:
    """What a voice contributes to synthesis. Shapes for a clip of >= 10 s: t3_prompt_tokens (1, 150),
    gen_prompt_token (1, 250), gen_prompt_feat (1, 500, 80); shorter clips give proportionally fewer.
    gen_prompt_feat has 2T frames, or 2T+1 when the clip's 24 kHz length is an odd number of 480-sample hops
    (the official code keeps that extra frame, and S3Gen then takes all of it as prompt)."""
    speaker_emb: torch.Tensor        # (1, 256) float32, VE embedding (T3)
    t3_prompt_tokens: torch.Tensor   # (1, <=150) int64, S3 tokens of the first 6 s (T3 speech prompt)
    gen_prompt_token: torch.Tensor   # (1, T) int64, S3 tokens of the first 10 s (S3Gen prompt)
    gen_prompt_feat: torch.Tensor    # (1, 2T[+1], 80) float32, log-mel of the first 10 s at 24 kHz (S3Gen prompt)
    gen_embedding: torch.Tensor      # (1, 192) float32, CAMPPlus x-vector (S3Gen speaker)
    emotion_adv: float = 0.5         # exaggeration stored with a conds.pt (requests override it)

    def to(self, device: torch.device | str) -> "VoiceConditionals":
        return VoiceConditionals(self.speaker_emb.to(device), self.t3_prompt_tokens.to(device),
                                 self.gen_prompt_token.to(device), self.gen_prompt_feat.to(device),
                                 self.gen_embedding.to(device), self.emotion_adv)

    @property
    def device(self) -> torch.device:
        return self.speaker_emb.device


# ------------------------------------------------------------------------------------------- conds.pt format

def load_builtin_voice(path: str | Path, device: torch.device | str = "cpu") -> VoiceConditionals:
    """Read an official `conds.pt` ({'t3': T3Cond fields, 'gen': S3Gen ref dict}) with weights_only loading."""
    data = read_torch(path)
    try:
        t3, gen = data["t3"], data["gen"]
        emotion = t3.get("emotion_adv", 0.5)
        emotion = float(emotion.reshape(-1)[0]) if torch.is_tensor(emotion) else float(emotion)
        conds = VoiceConditionals(
            speaker_emb=t3["speaker_emb"].float().reshape(1, -1),
            t3_prompt_tokens=torch.atleast_2d(t3["cond_prompt_speech_tokens"]).long(),
            gen_prompt_token=torch.atleast_2d(gen["prompt_token"]).long(),
            gen_prompt_feat=gen["prompt_feat"].float(),
            gen_embedding=gen["embedding"].float().reshape(1, -1),
            emotion_adv=emotion)
    except Exception as e:   # keys missing, not tensors
        raise CheckpointError(f"{path} is not a Chatterbox conds.pt ({type(e).__name__}: {e})") from None
    n_tok = conds.gen_prompt_token.shape[1]
    if conds.gen_prompt_feat.dim() != 3 or conds.gen_prompt_feat.shape[1] not in (2 * n_tok, 2 * n_tok + 1):
        raise CheckpointError(f"{path}: prompt_feat {tuple(conds.gen_prompt_feat.shape)} does not match "
                              f"prompt_token {tuple(conds.gen_prompt_token.shape)} (needs 2 mel frames per token)")
    return conds.to(device)


def save_builtin_voice(conds: VoiceConditionals, path: str | Path) -> None:
    """Write `conds` in the official conds.pt layout (readable by chatterbox-tts' Conditionals.load)."""
    c = conds.to("cpu")
    t3 = dict(speaker_emb=c.speaker_emb, clap_emb=None, cond_prompt_speech_tokens=c.t3_prompt_tokens,
              cond_prompt_speech_emb=None, emotion_adv=c.emotion_adv * torch.ones(1, 1, 1))
    gen = dict(prompt_token=c.gen_prompt_token,
               prompt_token_len=torch.tensor([c.gen_prompt_token.shape[1]], dtype=torch.long),
               prompt_feat=c.gen_prompt_feat, prompt_feat_len=None, embedding=c.gen_embedding)
    torch.save(dict(t3=t3, gen=gen), str(path))


# ------------------------------------------------------------------------------------------------ front end

def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_voice_encoder(ckpt_dir: str | Path, config: dict | None = None, ve_file: str = "ve.safetensors"
                       ) -> VoiceEncoder:
    """The voice encoder from `ve_file` (ve.safetensors; Multilingual: ve.pt, torch-saved, read with
    weights_only=True), loaded strictly (on the CPU, eval mode); sizes from tensor shapes, the rest from `config`
    (the checkpoint's configuration, section "voice_encoder"; read when not given)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir) if config is None else config
    path = ckpt_dir / ve_file
    sd = read_weights(path)
    ve = VoiceEncoder(config_from_state_dict(VoiceEncoderConfig.from_state_dict, sd, config.get("voice_encoder"),
                                             str(path)))
    load_strict(ve, sd, what=str(path))
    return ve.eval()


def load_voice_modules(ckpt_dir: str | Path, device: torch.device | str = "cpu",
                       s3gen_state: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                       s3gen_file: str = "s3gen.safetensors", ve_file: str = "ve.safetensors"
                       ) -> tuple[VoiceEncoder, S3TokenizerV2, CAMPPlus]:
    """The three front-end networks, loaded strictly: VE from ve.safetensors, the tokenizer and speaker encoder
    from the `tokenizer.` / `speaker_encoder.` parts of s3gen.safetensors (pass `s3gen_state` to reuse an
    already-read file; otherwise only those parts are read). Sizes come from tensor shapes; what shapes cannot
    say from `config` (the checkpoint's configuration, read when not given; sections "voice_encoder",
    "s3tokenizer" and "campplus", as S3Gen reads them)."""
    ckpt_dir = Path(ckpt_dir)
    overrides = read_config(ckpt_dir) if config is None else config
    ve = load_voice_encoder(ckpt_dir, overrides, ve_file)
    s3 = s3gen_state if s3gen_state is not None else read_weights(ckpt_dir / s3gen_file,
                                                                   ("tokenizer.", "speaker_encoder."))
    tok_sd, spk_sd = _prefixed(s3, "tokenizer."), _prefixed(s3, "speaker_encoder.")
    if not tok_sd or not spk_sd:
        raise CheckpointError(f"{s3gen_file} has no tokenizer.* or speaker_encoder.* weights")
    tok = S3TokenizerV2(config_from_state_dict(S3TokenizerConfig.from_state_dict, tok_sd, overrides.get("s3tokenizer"),
                                               f"{s3gen_file} (tokenizer.*)"))
    load_strict(tok, tok_sd, what=f"{s3gen_file} (tokenizer.*)")
    spk = CAMPPlus(config_from_state_dict(CAMPPlusConfig.from_state_dict, spk_sd, overrides.get("campplus"),
                                          f"{s3gen_file} (speaker_encoder.*)"))
    load_strict(spk, spk_sd, what=f"{s3gen_file} (speaker_encoder.*)")
    return ve.to(device).eval(), tok.to(device).eval(), spk.to(device).eval()


def _as_mono_float32(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim == 2:                      # (frames, channels), as soundfile returns; librosa averages channels
        x = x.astype(np.float32).mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"reference audio must be mono samples, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("reference audio contains NaN or infinite samples")
    return np.ascontiguousarray(x)


class VoiceFrontEnd:
    """Computes VoiceConditionals from a reference clip with the given (already placed) networks."""

    def __init__(self, ve: VoiceEncoder, tokenizer: S3TokenizerV2, speaker_encoder: CAMPPlus,
                 settings: VoiceSettings = VoiceSettings()):
        self.ve, self.tokenizer, self.speaker_encoder = ve, tokenizer, speaker_encoder
        self.settings = settings

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: torch.device | str = "cpu", settings: VoiceSettings = VoiceSettings(),
             s3gen_file: str = "s3gen.safetensors", ve_file: str = "ve.safetensors") -> "VoiceFrontEnd":
        return cls(*load_voice_modules(ckpt_dir, device, s3gen_file=s3gen_file, ve_file=ve_file), settings=settings)

    @property
    def device(self) -> torch.device:
        return self.tokenizer.encoder.conv1.weight.device

    @torch.inference_mode()
    def compute(self, samples: np.ndarray, sample_rate: int) -> VoiceConditionals:
        if sample_rate <= 0:
            raise ValueError(f"invalid sample rate {sample_rate}")
        x = _as_mono_float32(samples)
        if x.shape[0] < MIN_SECONDS * sample_rate:
            raise ValueError(f"reference audio is too short ({x.shape[0] / sample_rate:.2f} s); "
                             f"give at least {MIN_SECONDS} s (ideally 6-10 s) of speech")
        if not (np.abs(x) > SILENCE_LEVEL).any():
            raise ValueError("reference audio is silent")
        dev, settings = self.device, self.settings
        wav24 = audio.soxr_resample(x, int(sample_rate), audio.S3GEN_SR)          # librosa.load(sr=24000)
        if settings.longer_than_seconds is not None and len(wav24) <= settings.longer_than_seconds * audio.S3GEN_SR:
            raise ValueError(f"reference audio is too short ({len(wav24) / audio.S3GEN_SR:.2f} s); this model needs "
                             f"more than {settings.longer_than_seconds:g} s of speech (ideally 10-15 s)")
        if settings.loudness_lufs is not None:
            wav24 = audio.normalize_loudness(wav24, audio.S3GEN_SR, settings.loudness_lufs)
        ref16 = audio.soxr_resample(wav24, audio.S3GEN_SR, audio.S3_SR)          # librosa.resample, full clip

        # S3Gen reference (first 10 s at 24 kHz)
        gen24 = torch.from_numpy(wav24[:S3GEN_PROMPT_SECONDS * audio.S3GEN_SR]).to(dev)[None]
        prompt_feat = audio.s3gen_prompt_mel(gen24).transpose(1, 2)              # (1, 2T, 80)
        gen16 = audio.sinc_resample(gen24, audio.S3GEN_SR, audio.S3_SR)[0]       # torchaudio-style resampler
        embedding = self.speaker_encoder.embed(gen16)
        prompt_token, _ = self.tokenizer.tokenize([gen16])
        prompt_token = prompt_token[:, :prompt_feat.shape[1] // 2]

        # T3 speech prompt (first 6 s of ref16; Turbo 15 s) and VE embedding (all of ref16, trimmed)
        t3_wav = torch.from_numpy(ref16[:int(settings.t3_prompt_seconds * audio.S3_SR)]).to(dev)
        t3_tokens, _ = self.tokenizer.tokenize([t3_wav], max_len=settings.t3_prompt_tokens)
        speaker_emb = self.ve.embed_wav(ref16).to(dev)

        if not (torch.isfinite(speaker_emb).all() and torch.isfinite(embedding).all()):
            raise ValueError("reference audio gives no usable speaker embedding (is it speech?)")
        return VoiceConditionals(speaker_emb=speaker_emb.float(), t3_prompt_tokens=t3_tokens.long(),
                                 gen_prompt_token=prompt_token.long(), gen_prompt_feat=prompt_feat.float(),
                                 gen_embedding=embedding.float())


# ------------------------------------------------------------------------------------------------------ cache

def voice_key(samples: np.ndarray, sample_rate: int) -> str:
    """Content hash of a clip: equal samples and rate <=> equal key."""
    x = np.ascontiguousarray(np.asarray(samples, dtype=np.float32))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{int(sample_rate)}:{x.shape}:".encode())
    h.update(x.tobytes())
    return h.hexdigest()


class VoiceCache:
    """LRU cache of VoiceConditionals keyed by the clip's content hash; thread-safe. Concurrent requests for
    the same new voice compute it once (the others wait for that result)."""

    def __init__(self, front_end: VoiceFrontEnd, max_entries: int = 128):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.front_end = front_end
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, VoiceConditionals] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return dict(entries=len(self._entries), max_entries=self.max_entries, hits=self.hits, misses=self.misses)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, voice: VoiceAudio) -> VoiceConditionals:
        key = voice_key(voice.samples, voice.sample_rate)
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key]
                pending = self._pending.get(key)
                if pending is None:
                    self.misses += 1
                    event = self._pending[key] = threading.Event()
                    break
            pending.wait()   # another thread is computing this voice; then look again (it may have failed)
        try:
            conds = self.front_end.compute(voice.samples, voice.sample_rate)
            with self._lock:
                self._entries[key] = conds
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            return conds
        finally:
            with self._lock:
                del self._pending[key]
            event.set()


# -------------------------------------------------------------------------------------------- serialised form

CONDS_FORMAT = "chatterbox-conds/1"
_CONDS_FIELDS = ("speaker_emb", "t3_prompt_tokens", "gen_prompt_token", "gen_prompt_feat", "gen_embedding")


def conditionals_to_bytes(conds: VoiceConditionals) -> bytes:
    """`conds` as safetensors bytes (lossless: the same tensors come back)."""
    from safetensors.torch import save
    tensors = {name: getattr(conds, name).detach().to("cpu").contiguous() for name in _CONDS_FIELDS}
    tensors["format"] = torch.frombuffer(bytearray(CONDS_FORMAT.encode()), dtype=torch.uint8)
    tensors["emotion_adv"] = torch.tensor([float(conds.emotion_adv)], dtype=torch.float64)
    return save(tensors)


def conditionals_from_bytes(data: bytes, device: torch.device | str = "cpu") -> VoiceConditionals:
    """The VoiceConditionals `conditionals_to_bytes` wrote. ValueError for anything else."""
    from safetensors.torch import load
    try:
        tensors = load(bytes(data))
        fmt = bytes(tensors["format"].numpy()).decode()
        if fmt != CONDS_FORMAT:
            raise ValueError(f"format {fmt!r}")
        conds = VoiceConditionals(*(tensors[name] for name in _CONDS_FIELDS),
                                  emotion_adv=float(tensors["emotion_adv"][0]))
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, other keys
        raise ValueError(f"stored voice conditionals are unreadable ({type(e).__name__}: {e})") from None
    return conds.to(device)


def front_end_fingerprint(front_end: VoiceFrontEnd) -> str:
    """A content hash of the networks that compute conditionals (VE, S3 tokenizer, CAMPPlus) and of the variant's
    VoiceSettings: two engines with the same fingerprint compute the same conditionals from the same clip."""
    h = hashlib.blake2b(digest_size=16)
    h.update(CONDS_FORMAT.encode())
    h.update(repr(front_end.settings).encode())
    for part, module in (("ve", front_end.ve), ("tok", front_end.tokenizer), ("spk", front_end.speaker_encoder)):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- parity

def parity_outputs(ckpt_dir: Path, ref: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Our versions of the `cond.*` tensors of reference.safetensors, from <ckpt_dir>/reference_voice.wav, with
    the front end of the checkpoint's variant (Turbo: also `cond.ref_lufs`, the clip's loudness before scaling)."""
    import soundfile as sf
    from .variants import detect_variant
    ckpt_dir = Path(ckpt_dir)
    variant = detect_variant(ckpt_dir)
    samples, sr = sf.read(str(ckpt_dir / "reference_voice.wav"), dtype="float32")
    front_end = VoiceFrontEnd.load(ckpt_dir, "cpu", settings=variant.voice, s3gen_file=variant.s3gen_file,
                                   ve_file=variant.ve_file)
    conds = front_end.compute(samples, sr)
    out = {"cond.ve_embedding": conds.speaker_emb, "cond.t3_prompt_tokens": conds.t3_prompt_tokens,
           "cond.gen_prompt_token": conds.gen_prompt_token, "cond.gen_prompt_feat": conds.gen_prompt_feat,
           "cond.gen_embedding": conds.gen_embedding}
    if variant.voice.loudness_lufs is not None:
        wav24 = audio.soxr_resample(_as_mono_float32(samples), int(sr), audio.S3GEN_SR)
        out["cond.ref_lufs"] = torch.tensor([audio.integrated_loudness(wav24, audio.S3GEN_SR)], dtype=torch.float64)
    return out
