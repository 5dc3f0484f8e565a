"""T3: text tokens + conditioning -> speech tokens (a Llama or GPT-2 backbone with its own embeddings and heads).

The module only embeds and projects; the decoding loop (batching, KV cache, sampling) is `engine/t3_decoder.py`.
Two architectures, as the official `T3(hp)` builds them; which one is the variant's choice (engine/variants.py),
the sizes are read from the tensors:

backbone "llama", conditioning "perceiver" (the original model, `t3_cfg.safetensors`): keys `tfmr.*` (see
models/llama.py), `cond_enc.spkr_enc`, `cond_enc.emotion_adv_fc`, `cond_enc.perceiver.*`, `text_emb`,
`speech_emb`, `text_pos_emb.emb`, `speech_pos_emb.emb`, `text_head` (training only, kept so the load is strict),
`speech_head`. One row, as chatterbox-tts 0.1.7 builds it:
    [speaker (1) | perceiver(prompt) (32) | emotion (1)] [START text STOP] [BOS] [BOS] then generated tokens
text positions are 0..N+1 (learned), both BOS take speech position 0, generated token i takes speech position
i+1; the unconditional CFG row has zeroed text-token embeddings (its text position embeddings stay).

backbone "gpt2", conditioning "prompt" (Turbo, `t3_turbo_v1.safetensors`): keys `tfmr.*` (see models/gpt2.py),
`cond_enc.spkr_enc`, `text_emb`, `speech_emb`, `text_head`, `speech_head` (with a bias). One row:
    [speaker (1) | prompt speech tokens (up to 375)] [text] [START] then generated tokens
embedded without Chatterbox's own positions: GPT-2's `wpe` numbers the whole row from 0 (the backbone adds it).
The text has no START/STOP tokens; there is no CFG row.

The Multilingual model (`t3_mtl23ls_v2.safetensors`) is the first architecture with 2454 text ids; its variant
sets `alignment_stop`, and `alignment_heads` names the (layer, head) pairs engine/alignment.py reads (the
official three by default; a smaller test checkpoint names its own in serverless_config.json).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import (CONFIG_FILE, CheckpointError, config_from_state_dict, load_strict, naming, read_config,
                          read_safetensors)
from .gpt2 import GPT2Config, GPT2Model
from .llama import LlamaConfig, LlamaModel
from .perceiver import Perceiver

BACKBONES = ("llama", "gpt2")
CONDITIONINGS = ("perceiver", "prompt")


@dataclass
class T3Config:
    backbone: str = "llama"                   # "llama" (RoPE, learned Chatterbox positions) or "gpt2" (wpe)
    conditioning: str = "perceiver"           # "perceiver": [speaker | perceiver | emotion]; "prompt": [speaker | prompt]
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 30
    num_heads: int = 16
    head_dim: int = 64
    backbone_vocab_size: int = 8              # tfmr.embed_tokens / tfmr.wte (unused)
    rms_norm_eps: float = 1e-5                # llama
    rope_theta: float = 500000.0
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    layer_norm_eps: float = 1e-5              # gpt2
    max_positions: int = 8196                 # gpt2: tfmr.wpe rows, the longest row (conditioning + text + speech)
    text_vocab_size: int = 704
    speech_vocab_size: int = 8194
    max_text_positions: int = 2050           # text_pos_emb rows (max_text_tokens + 2); gpt2: no such table
    max_speech_positions: int = 4100         # speech_pos_emb rows (max_speech_tokens + 4); gpt2: no such table
    speaker_embed_size: int = 256
    perceiver_queries: int = 32
    perceiver_heads: int = 4
    start_text_token: int = 255
    stop_text_token: int = 0
    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    prompt_len: int = 150                     # conditioning prompt tokens (speech_cond_prompt_len)
    # Multilingual: stop decoding by the text alignment read from these (layer, head) pairs (engine/alignment.py)
    alignment_stop: bool = False
    alignment_heads: tuple[tuple[int, int], ...] = ((12, 15), (13, 11), (9, 2))

    def __post_init__(self):
        self.alignment_heads = tuple((int(layer), int(head)) for layer, head in self.alignment_heads)
        if self.alignment_stop:
            bad = [lh for lh in self.alignment_heads if not (0 <= lh[0] < self.num_layers and 0 <= lh[1] < self.num_heads)]
            if bad or not self.alignment_heads:
                raise CheckpointError(f"T3: alignment head(s) {bad or '(none)'} are not among the model's "
                                      f"{self.num_layers} layers x {self.num_heads} heads; set t3.alignment_heads in "
                                      f"{CONFIG_FILE}")
        if self.backbone not in BACKBONES:
            raise CheckpointError(f"T3: unknown backbone {self.backbone!r} (one of {', '.join(BACKBONES)})")
        if self.conditioning not in CONDITIONINGS:
            raise CheckpointError(f"T3: unknown conditioning {self.conditioning!r} (one of {', '.join(CONDITIONINGS)})")

    @property
    def perceiver(self) -> bool:
        return self.conditioning == "perceiver"

    @property
    def learned_positions(self) -> bool:
        """Chatterbox's own text/speech position tables (llama); GPT-2 numbers the whole row with its wpe."""
        return self.backbone == "llama"

    @property
    def cond_len(self) -> int:
        """Conditioning positions for a prompt of `prompt_len` tokens (see `T3.cond_len` for other lengths)."""
        return self.cond_len_for(self.prompt_len)

    def cond_len_for(self, prompt_len: int) -> int:
        return 1 + self.perceiver_queries + 1 if self.perceiver else 1 + int(prompt_len)

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, head_dim=self.head_dim, vocab_size=self.backbone_vocab_size,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_factor=self.rope_factor,
            rope_low_freq_factor=self.rope_low_freq_factor, rope_high_freq_factor=self.rope_high_freq_factor,
            rope_original_max_positions=self.rope_original_max_positions)

    def gpt2(self) -> GPT2Config:
        return GPT2Config(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_layers=self.num_layers, num_heads=self.num_heads, vocab_size=self.backbone_vocab_size,
                          max_positions=self.max_positions, layer_norm_eps=self.layer_norm_eps)

    @classmethod
    def tiny(cls) -> "T3Config":
        """A small random-weight configuration for tests (token ids and vocabularies as the real model)."""
        return cls(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, head_dim=8,
                   max_text_positions=130, max_speech_positions=260, speaker_embed_size=16,
                   perceiver_queries=4, perceiver_heads=2, prompt_len=12)

    @classmethod
    def tiny_turbo(cls) -> "T3Config":
        """Turbo's architecture (GPT-2, raw prompt, 6563 speech ids) at test size; text ids of a small BPE."""
        return cls(backbone="gpt2", conditioning="prompt", hidden_size=32, intermediate_size=128, num_layers=2,
                   num_heads=4, head_dim=8, backbone_vocab_size=1024, text_vocab_size=1024, speech_vocab_size=6563,
                   max_positions=1024, speaker_embed_size=16, prompt_len=40)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], overrides: dict[str, Any] | None = None) -> "T3Config":
        """Sizes from the tensors; the architecture (`backbone`, `conditioning`) and head counts (which shapes
        cannot give) from `overrides` (T3Config field names; the variant sets the architecture) or the defaults."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"T3: unknown configuration key(s) {', '.join(unknown)}")
        backbone = overrides.pop("backbone", cls.backbone)
        conditioning = overrides.pop("conditioning", cls.conditioning)
        if backbone == "gpt2":
            needed = ["tfmr.h.0.attn.c_attn.weight", "tfmr.h.0.mlp.c_fc.weight", "tfmr.wte.weight", "tfmr.wpe.weight"]
        else:
            needed = ["tfmr.layers.0.mlp.gate_proj.weight", "tfmr.layers.0.self_attn.q_proj.weight",
                      "tfmr.embed_tokens.weight", "text_pos_emb.emb.weight", "speech_pos_emb.emb.weight"]
        needed += ["text_emb.weight", "speech_emb.weight", "cond_enc.spkr_enc.weight"]
        if conditioning == "perceiver":
            needed.append("cond_enc.perceiver.pre_attention_query")
        absent = [k for k in needed if k not in sd]
        if absent:
            raise CheckpointError(f"T3: not a T3 checkpoint of the {backbone}/{conditioning} architecture, "
                                  f"missing key(s) {', '.join(absent)}")
        hidden = sd["text_emb.weight"].shape[1]
        # GPT-2 sizes all have 64-dimensional heads (small 12 x 64, medium 16 x 64); Llama's default is T3's 16
        num_heads = int(overrides.pop("num_heads", max(1, hidden // 64) if backbone == "gpt2" else cls.num_heads))
        found = dict(backbone=backbone, conditioning=conditioning, hidden_size=hidden, num_heads=num_heads,
                     text_vocab_size=sd["text_emb.weight"].shape[0], speech_vocab_size=sd["speech_emb.weight"].shape[0],
                     speaker_embed_size=sd["cond_enc.spkr_enc.weight"].shape[1])
        if backbone == "gpt2":
            layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("tfmr.h.")}
            inner = sd["tfmr.h.0.attn.c_attn.weight"].shape[1] // 3
            found.update(intermediate_size=sd["tfmr.h.0.mlp.c_fc.weight"].shape[1],
                         backbone_vocab_size=sd["tfmr.wte.weight"].shape[0],
                         max_positions=sd["tfmr.wpe.weight"].shape[0])
        else:
            layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("tfmr.layers.")}
            inner = sd["tfmr.layers.0.self_attn.q_proj.weight"].shape[0]
            found.update(intermediate_size=sd["tfmr.layers.0.mlp.gate_proj.weight"].shape[0],
                         backbone_vocab_size=sd["tfmr.embed_tokens.weight"].shape[0],
                         max_text_positions=sd["text_pos_emb.emb.weight"].shape[0],
                         max_speech_positions=sd["speech_pos_emb.emb.weight"].shape[0])
        if inner % num_heads:
            raise CheckpointError(f"T3: attention width {inner} is not divisible by {num_heads} heads; "
                                  f"set num_heads in {CONFIG_FILE}")
        if backbone == "gpt2" and inner != hidden:
            raise CheckpointError(f"T3: GPT-2 attention width {inner} differs from the hidden size {hidden}")
        found.update(num_layers=max(layer_ids) + 1 if layer_ids else 0, head_dim=inner // num_heads)
        if conditioning == "perceiver":
            found["perceiver_queries"] = sd["cond_enc.perceiver.pre_attention_query"].shape[1]
        found.update(overrides)
        return cls(**found)


class LearnedPositionEmbeddings(nn.Module):
    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(num_positions, dim)

    def forward(self, positions: Tensor) -> Tensor:
        return self.emb(positions)


class CondEnc(nn.Module):
    """The conditioning positions: "perceiver": speaker embedding, prompt-token perceiver and exaggeration
    ("emotion_adv") -> (B, 34, C); "prompt": speaker embedding and the prompt-token embeddings as they are ->
    (B, 1 + P, C)."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.speaker_embed_size = cfg.speaker_embed_size
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.hidden_size)
        if cfg.perceiver:
            self.emotion_adv_fc = nn.Linear(1, cfg.hidden_size, bias=False)
            self.perceiver = Perceiver(cfg.perceiver_queries, cfg.hidden_size, cfg.perceiver_heads)

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor, exaggeration: Tensor) -> Tensor:
        spk = self.spkr_enc(speaker_emb.reshape(-1, self.speaker_embed_size))[:, None]
        if not hasattr(self, "perceiver"):
            return torch.cat((spk, prompt_emb), dim=1)
        prompt = self.perceiver(prompt_emb)
        emotion = self.emotion_adv_fc(exaggeration.reshape(-1, 1, 1))
        return torch.cat((spk, prompt, emotion), dim=1)


class T3(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.tfmr = GPT2Model(cfg.gpt2()) if cfg.backbone == "gpt2" else LlamaModel(cfg.llama())
        self.cond_enc = CondEnc(cfg)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, C)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, C)
        if cfg.learned_positions:
            self.text_pos_emb = LearnedPositionEmbeddings(cfg.max_text_positions, C)
            self.speech_pos_emb = LearnedPositionEmbeddings(cfg.max_speech_positions, C)
        self.text_head = nn.Linear(C, cfg.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(C, cfg.speech_vocab_size, bias=cfg.backbone == "gpt2")

    @property
    def device(self) -> torch.device:
        return self.speech_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_head.weight.dtype

    # ---- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def unwrap_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        if sd and all(k.startswith("model.") for k in sd):
            return {k[len("model."):]: v for k, v in sd.items()}
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], overrides: dict[str, Any] | None = None,
                        what: str = "T3 (t3_cfg.safetensors)") -> "T3":
        sd = cls.unwrap_state_dict(sd)
        model = cls(config_from_state_dict(T3Config.from_state_dict, sd, overrides, what))
        load_strict(model, sd, what=what)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, prepack: bool = True, config: dict | None = None,
                        filename: str = "t3_cfg.safetensors", architecture: dict | None = None) -> "T3":
        """Load `filename` (the variant's T3 file) from a checkpoint directory. `architecture`: the variant's
        backbone and conditioning (T3Config fields; default: the original's). `config`: the checkpoint's
        configuration (`checkpoint.read_config`, read here when not given), section "t3".
        `prepack`: on CPU, keep a oneDNN-packed copy of the backbone weights (faster; twice the memory)."""
        ckpt_dir = Path(ckpt_dir)
        overrides = {**(read_config(ckpt_dir) if config is None else config).get("t3", {}), **(architecture or {})}
        path = ckpt_dir / filename
        with naming(path):
            model = cls.from_state_dict(read_safetensors(path), overrides, what=f"T3 ({filename})")
        if isinstance(model.tfmr, GPT2Model):
            del model.tfmr.wte        # GPT-2's own token table: loaded (strictly), never used (the official deletes it)
        model = model.to(device=device, dtype=dtype)
        model.tfmr.set_prepacked_weights(prepack)
        return model

    # ---- sizes ---------------------------------------------------------------------------------------------
    def cond_len(self, prompt_len: int) -> int:
        """Conditioning positions for a voice prompt of `prompt_len` speech tokens."""
        return self.cfg.cond_len_for(prompt_len)

    def check_lengths(self, n_text: int, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError (a message for the caller) when a row of `n_text` text tokens (without framing) and a
        prompt of `prompt_len` tokens, decoding up to `max_new_tokens`, does not fit the position tables."""
        cfg = self.cfg
        if cfg.learned_positions:
            if n_text + 2 > cfg.max_text_positions:
                raise ValueError(f"text too long: {n_text} tokens, at most {cfg.max_text_positions - 2}")
            if not 1 <= max_new_tokens <= cfg.max_speech_positions - 1:
                raise ValueError(f"max_new_tokens must be in [1, {cfg.max_speech_positions - 1}]")
            return
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        total = self.cond_len(prompt_len) + n_text + 1 + max_new_tokens
        if total > cfg.max_positions:
            raise ValueError(f"text too long: {n_text} tokens and {max_new_tokens} speech tokens need {total} "
                             f"positions, the model has {cfg.max_positions}")

    def max_new_tokens_for(self, n_text: int, prompt_len: int) -> int:
        """The most speech tokens a row can decode after its prefix (position tables)."""
        cfg = self.cfg
        if cfg.learned_positions:
            return cfg.max_speech_positions - 1
        return cfg.max_positions - self.cond_len(prompt_len) - n_text - 1

    # ---- embeddings ----------------------------------------------------------------------------------------
    def conditioning(self, speaker_emb: Tensor, prompt_tokens: Tensor, exaggeration: Tensor) -> Tensor:
        """speaker_emb (B, S), prompt_tokens (B, P) int, exaggeration (B,) -> (B, cond_len, C)."""
        prompt_tokens = prompt_tokens.to(self.device, torch.long)
        P = prompt_tokens.shape[1]
        prompt_emb = self.speech_emb(prompt_tokens)
        if self.cfg.learned_positions:
            prompt_emb = prompt_emb + self.speech_pos_emb(torch.arange(P, device=self.device))
        return self.cond_enc(speaker_emb.to(self.device, self.dtype), prompt_emb,
                             exaggeration.to(self.device, self.dtype))

    def frame_text(self, text_ids) -> Tensor:
        """The text tokens as the row holds them: [START text STOP] (llama) or the text as it is (gpt2)."""
        ids = [int(i) for i in text_ids]
        if self.cfg.learned_positions:
            ids = [self.cfg.start_text_token, *ids, self.cfg.stop_text_token]
        return torch.tensor(ids, dtype=torch.long)

    def prefix_embeds(self, cond: Tensor, text_ids: Tensor, cfg: bool) -> Tensor:
        """The prefill input of one request: cond (cond_len, C), text_ids (L,) framed (`frame_text`).
        Returns (2 if cfg else 1, cond_len + L + n_bos, C); row 1 is the unconditional CFG row."""
        text = self.text_embeds(text_ids, cfg)
        return torch.cat((cond[None].expand(text.shape[0], -1, -1), text), dim=1)

    def text_embeds(self, text_ids: Tensor, cfg: bool) -> Tensor:
        """The part of the prefix after the conditioning, from framed text ids (L,): [text | BOS | BOS] with
        learned positions (2 rows with CFG), [text | START] for GPT-2 (one row; no CFG there)."""
        text_ids = text_ids.to(self.device, torch.long)
        L = text_ids.shape[0]
        start = torch.tensor([self.cfg.start_speech_token], device=self.device)
        if not self.cfg.learned_positions:
            if cfg:
                raise ValueError("this T3 has no CFG row")
            return torch.cat((self.text_emb(text_ids), self.speech_emb(start)))[None]
        text_pos = self.text_pos_emb(torch.arange(L, device=self.device))
        text = self.text_emb(text_ids) + text_pos
        bos = self.speech_embeds(start, torch.zeros(1, dtype=torch.long, device=self.device))[0]
        rows = [torch.cat((text, bos, bos))]
        if cfg:
            rows.append(torch.cat((torch.zeros_like(text) + text_pos, bos, bos)))
        return torch.stack(rows)

    def speech_embeds(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (R,), speech positions (R,) -> (R, 1, C) (GPT-2: the backbone adds its own positions)."""
        x = self.speech_emb(tokens)
        if self.cfg.learned_positions:
            x = x + self.speech_pos_emb(positions)
        return x[:, None]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.speech_head(hidden)
