"""The Chatterbox family as data: one `Variant` per model, from which the engine is built.

A variant says which files make its checkpoint, the architecture of each network (the sizes always come from
the tensors, so the official sizes, smaller ones of the same architecture and the tiny test checkpoints load
through the same code), how text becomes token ids, how a reference clip becomes conditionals, how a speech
token is sampled, and how the flow solves. `Variant.load` builds the parts (`EngineParts`) and the engine
(engine/pipeline.py) works with those parts only: no other module branches on a model's name.

    variant       T3 file / backbone / conditioning                 text front-end         sampling     flow solver
    original      t3_cfg.safetensors, Llama 520M, perceiver+emotion  English (tokenizer.json) CFG, min_p  10-step CFG cosine
    turbo         t3_turbo_v1.safetensors, GPT-2, raw 375-token      GPT-2 BPE + tags        top_k, top_p  2-step meanflow
                  prompt                                                                     (no CFG)      (+3 silence tokens)
    multilingual  t3_mtl23ls_v2.safetensors, the original's T3 with  graphemes + [lang],     CFG, min_p,   10-step CFG cosine
                  2454 text ids; ve.pt, s3gen.pt (torch-saved)       per-language prep       alignment stop

A variant is recognised from a checkpoint directory by its T3 file (`detect_variant`; the order of
catalog.T3_FILES: a directory holding the original's and the Multilingual's files, as the official repo does, is
the original unless the variant is named), and from a Hugging Face repo id by catalog.OFFICIAL_REPOS
(`variant_for_repo`; engine/resolve.py downloads only the variant's files; `multilingual=ResembleAI/chatterbox`
names the Multilingual model of the shared repo).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .catalog import API_MODELS, OFFICIAL_REPOS, T3_FILES
from .checkpoint import CheckpointError, read_config
from .conditioning import VoiceConditionals, VoiceFrontEnd, VoiceSettings, load_builtin_voice, load_voice_encoder
from .models.s3gen import S3Gen
from .models.t3 import T3
from .sampling import CHAINS, SamplingChain
from .text import FRONT_ENDS

S3GEN_SIL = 4299          # the S3 token of silence (Turbo appends three before S3Gen)


@dataclass(frozen=True)
class Variant:
    name: str
    repo_id: str                                  # the official Hugging Face repo
    t3_file: str
    s3gen_file: str
    text_files: tuple[tuple[str, ...], ...]       # the text front-end's files: any one complete group will do
    t3: dict                                      # T3 architecture (T3Config fields: backbone, conditioning, ...)
    flow: dict                                    # S3Gen flow architecture (FlowConfig fields, "decoder": {...})
    text_front_end: str                           # text.FRONT_ENDS
    sampling: str                                 # sampling.CHAINS
    voice: VoiceSettings = field(default_factory=VoiceSettings)
    flow_suffix_tokens: tuple[int, ...] = ()      # appended to every chunk's speech tokens before S3Gen
    builtin_voice_required: bool = True           # conds.pt must be there (else: requests must bring a voice)
    extra_files: tuple[str, ...] = ()             # downloaded with the checkpoint when the repo has them
    ve_file: str = "ve.safetensors"
    builtin_voice_file: str = "conds.pt"
    max_new_tokens: int = 1000                    # the official bound per chunk (40 s)
    api_model: str = "chatterbox-tts"             # the model name the API serves it under (catalog.API_MODELS)

    # ---- files ----------------------------------------------------------------------------------------------
    def required_files(self) -> list[str]:
        files = [self.ve_file, self.t3_file, self.s3gen_file, *self.text_files[0]]
        return files + ([self.builtin_voice_file] if self.builtin_voice_required else [])

    def missing_files(self, ckpt_dir: str | Path) -> list[str]:
        """What the directory lacks for this variant (for the text files: the first group's, when no group is
        complete)."""
        d = Path(ckpt_dir)
        missing = [f for f in self.required_files() if f not in self.text_files[0] and not (d / f).is_file()]
        if not any(all((d / f).is_file() for f in group) for group in self.text_files):
            missing += [f for f in self.text_files[0] if not (d / f).is_file()]
        return missing

    def download_patterns(self) -> list[str]:
        """`allow_patterns` for huggingface_hub.snapshot_download: this variant's files only."""
        text = [f for group in self.text_files for f in group]
        return list(dict.fromkeys([self.ve_file, self.t3_file, self.s3gen_file, *text, self.builtin_voice_file,
                                   *self.extra_files]))

    # ---- parts ------------------------------------------------------------------------------------------------
    def architecture(self, config: dict) -> dict:
        """The checkpoint's configuration (serverless_config.json, sizes) with this variant's architecture merged
        in: its "t3" and "flow" sections."""
        merged = copy.deepcopy(config)
        merged["t3"] = {**merged.get("t3", {}), **self.t3}
        flow = merged.setdefault("flow", {})
        for k, v in self.flow.items():
            if isinstance(v, dict):
                flow[k] = {**flow.get(k, {}), **v}
            else:
                flow[k] = v
        return merged

    def load_text(self, ckpt_dir: str | Path):
        """The text front-end alone (FRONT_ENDS[self.text_front_end] on the directory's files)."""
        return FRONT_ENDS[self.text_front_end](Path(ckpt_dir))

    def load_chain(self) -> SamplingChain:
        return CHAINS[self.sampling]()

    def load(self, ckpt_dir: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "EngineParts":
        """Load every part from `ckpt_dir`, strictly (CheckpointError naming the file on any problem)."""
        ckpt_dir = Path(ckpt_dir)
        device = torch.device(device)
        missing = self.missing_files(ckpt_dir)
        if missing:
            raise CheckpointError(f"{ckpt_dir} is not a complete Chatterbox {self.name} checkpoint: "
                                  f"{', '.join(missing)} missing.")
        config = self.architecture(read_config(ckpt_dir))
        text = self.load_text(ckpt_dir)
        t3 = T3.from_checkpoint(ckpt_dir, device=device, dtype=dtype, config=config, filename=self.t3_file)
        if text.vocab_size > t3.cfg.text_vocab_size:
            raise CheckpointError(f"{ckpt_dir}: the text tokenizer has {text.vocab_size} ids, {self.t3_file} embeds "
                                  f"{t3.cfg.text_vocab_size}")
        s3gen = S3Gen.from_checkpoint(ckpt_dir, device=device, dtype=dtype, config=config, filename=self.s3gen_file)
        ve = load_voice_encoder(ckpt_dir, config, self.ve_file)
        front_end = VoiceFrontEnd(ve.to(device).eval(), s3gen.tokenizer, s3gen.speaker_encoder, settings=self.voice)
        voice_path = ckpt_dir / self.builtin_voice_file
        builtin = load_builtin_voice(voice_path, device=device) if voice_path.is_file() else None
        return EngineParts(self, t3, self.load_chain(), text, s3gen, front_end, builtin)


@dataclass
class EngineParts:
    """What the engine is made of: the networks, loaded, and the variant's choices, ready to use."""
    variant: Variant
    t3: T3
    chain: SamplingChain              # how T3's logits become tokens
    text: Any                         # text front-end: .normalize(text) -> str, .encode(text) -> ids
    s3gen: S3Gen                      # tokenizer, speaker encoder, flow (with the variant's solver), vocoder
    voice_front_end: VoiceFrontEnd    # a clip -> VoiceConditionals, with the variant's settings
    builtin_voice: VoiceConditionals | None

    @property
    def sample_rate(self) -> int:
        return self.s3gen.sample_rate

    @property
    def flow_suffix_tokens(self) -> tuple[int, ...]:
        return self.variant.flow_suffix_tokens


ORIGINAL = Variant(
    name="original", repo_id="ResembleAI/chatterbox",
    t3_file="t3_cfg.safetensors", s3gen_file="s3gen.safetensors", text_files=(("tokenizer.json",),),
    t3=dict(backbone="llama", conditioning="perceiver"),
    flow=dict(solver="cfg-cosine", n_timesteps=10, decoder=dict(meanflow=False)),
    text_front_end="english", sampling="cfg-min_p", voice=VoiceSettings())

TURBO = Variant(
    name="turbo", repo_id="ResembleAI/chatterbox-turbo",
    t3_file="t3_turbo_v1.safetensors", s3gen_file="s3gen_meanflow.safetensors",
    text_files=(("vocab.json", "merges.txt"), ("tokenizer.json",)),
    extra_files=("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"),
    t3=dict(backbone="gpt2", conditioning="prompt", prompt_len=375),
    flow=dict(solver="meanflow", n_timesteps=2, decoder=dict(meanflow=True)),
    text_front_end="gpt2-bpe", sampling="turbo",
    voice=VoiceSettings(t3_prompt_seconds=15, t3_prompt_tokens=375, longer_than_seconds=5.0, loudness_lufs=-27.0),
    flow_suffix_tokens=(S3GEN_SIL,) * 3, builtin_voice_required=False, api_model="chatterbox-turbo")

MULTILINGUAL = Variant(
    name="multilingual", repo_id="ResembleAI/chatterbox",
    t3_file="t3_mtl23ls_v2.safetensors", s3gen_file="s3gen.pt", ve_file="ve.pt",
    text_files=(("grapheme_mtl_merged_expanded_v1.json",),), extra_files=("Cangjie5_TC.json",),
    t3=dict(backbone="llama", conditioning="perceiver", alignment_stop=True),
    flow=dict(solver="cfg-cosine", n_timesteps=10, decoder=dict(meanflow=False)),
    text_front_end="multilingual", sampling="cfg-min_p", voice=VoiceSettings(), api_model="chatterbox-multilingual")
"""Chatterbox Multilingual (chatterbox-tts 0.1.7 `ChatterboxMultilingualTTS`), 23 languages (engine/languages.py).

The original's architecture throughout: T3 (Llama 520M, perceiver, emotion) differs only in its 2454 text ids,
S3Gen and the voice encoder are the original's, read from torch-saved files (ve.pt, s3gen.pt; weights_only=True,
strict keys). Text: engine/text_multilingual.py (lowercase, NFKD, per-language preparation, the language token).
Decoding: the original's CFG / min_p chain with 0.1.7's `AlignmentStreamAnalyzer` (engine/alignment.py): the mean
attention of heads (12, 15), (13, 11), (9, 2) of the conditional row over the text suppresses the stop token
until the last 3 text tokens are reached and forces it on a long tail, on attention going back to earlier text,
or when the last two tokens drawn are the same. Its official `generate` defaults repetition_penalty to 2.0 (the
original's is 1.2): requests carry their parameters explicitly, so the API layer sets that per-model default.

Where this departs from 0.1.7:
  * attention: 0.1.7 switches the whole backbone to eager attention with output_attentions to read 3 heads;
    here every layer keeps SDPA and the 3 heads' probabilities are recomputed (softmax of q.k over the row's
    keys, float32) beside it: the same numbers to float rounding (t3.alignment in the parity dumps), and every
    row decodes batched.
  * the analyser's hooks are not re-registered on every call (0.1.7 stacks one more set per `inference()`;
    they all record the same thing, so nothing differs but memory).
  * a text of 3 tokens or fewer (with [START]/[STOP]: 5 positions) makes 0.1.7 fail (a max over no columns
    once the end is reached); here that reduction counts as 0, so nothing is forced by it.
  * CJK sentence enders and Devanagari / Arabic punctuation end a chunk when long text is split
    (engine/chunking.py); the official reads the whole text as one chunk.
"""

VARIANTS = {v.name: v for v in (ORIGINAL, TURBO, MULTILINGUAL)}
REPOS = {repo: VARIANTS[name] for repo, name in OFFICIAL_REPOS.items()}
assert all(API_MODELS[v.name] == v.api_model for v in VARIANTS.values()), "catalog.API_MODELS and the variants differ"
# the T3 files in catalog.T3_FILES order: the first one a directory holds names its default variant
_BY_T3_FILE = [VARIANTS[name] for name in T3_FILES.values() if name in VARIANTS]
assert {v.t3_file for v in _BY_T3_FILE} == set(T3_FILES) == {v.t3_file for v in VARIANTS.values()}
# the official ResembleAI/chatterbox repo holds both models' files: together they are the original's checkpoint
_SHARED_REPO = {ORIGINAL.name, MULTILINGUAL.name}


def _pick(found: list[Variant]) -> Variant | None:
    """The variant of a set of T3 files: the only one, or the original beside the Multilingual's."""
    if len(found) == 1:
        return found[0]
    if {v.name for v in found} == _SHARED_REPO:
        return ORIGINAL
    return None


def detect_variant(ckpt_dir: str | Path, name: str | None = None) -> Variant:
    """The variant whose T3 file the directory holds (the original's when it also holds the Multilingual's, as
    the official repo does); `name` asks for that variant (its T3 file must be there). CheckpointError when
    none, or several models not meant to share a directory, are there."""
    d = Path(ckpt_dir)
    if name is not None:
        if name not in VARIANTS:
            raise CheckpointError(f"{name!r} is not a model variant ({', '.join(VARIANTS)})")
        variant = VARIANTS[name]
        if not (d / variant.t3_file).is_file():
            raise CheckpointError(f"{d} is not a Chatterbox {name} checkpoint: it has no {variant.t3_file}.")
        return variant
    found = [v for v in _BY_T3_FILE if (d / v.t3_file).is_file()]
    picked = _pick(found)
    if picked is not None:
        return picked
    if not found:
        names = " or ".join(v.t3_file for v in _BY_T3_FILE)
        raise CheckpointError(f"{d} is not a Chatterbox checkpoint: it has no {names}.")
    raise CheckpointError(f"{d} holds the T3 files of several models ({', '.join(v.t3_file for v in found)}); "
                          f"keep one model per directory.")


def variant_for_repo(repo_id: str) -> Variant | None:
    """The variant of an official Hugging Face repo id (case-insensitive), or None for another repo."""
    return REPOS.get(repo_id.lower())


def variant_for_files(names: list[str]) -> Variant | None:
    """The variant whose T3 file is among `names` (a repo's file list), as `detect_variant` decides."""
    return _pick([v for v in _BY_T3_FILE if v.t3_file in names])
