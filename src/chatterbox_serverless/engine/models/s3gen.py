"""S3Gen: the container that holds all of `s3gen.safetensors` (key prefixes tokenizer., speaker_encoder., flow.,
mel2wav.) and loads it strictly. Turbo's `s3gen_meanflow.safetensors` is the same container with a meanflow
estimator (one more key, `flow.decoder.estimator.time_embed_mixer.weight`) and its 2-step solver: which file and
which solver is the variant's choice (engine/variants.py), passed in as `filename` and `architecture`.

The official code loads this file with strict=False; here every tensor must land in a module and every
module tensor must come from the file (only computable buffers such as the tokenizer's mel filters may be
absent). Speech tokens -> mel is `flow` (see models/flow.py), mel -> 24 kHz waveform is `mel2wav` (HiFT); the
batched path the pipeline calls is engine/speech_to_wav.py. The Multilingual checkpoint ships the same container
as a torch-saved state dict (`s3gen.pt`), read with weights_only=True (checkpoint.read_weights) and loaded as
strictly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_strict, naming, read_config, read_weights
from .campplus import CAMPPlus, CAMPPlusConfig
from .flow import CausalMaskedDiffWithXvec, FlowConfig
from .hift import HiFTConfig, HiFTGenerator
from .s3tokenizer import S3TokenizerConfig, S3TokenizerV2

S3GEN_SR = 24000


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@dataclass
class S3GenConfig:
    tokenizer: S3TokenizerConfig = field(default_factory=S3TokenizerConfig)
    speaker_encoder: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    mel2wav: HiFTConfig = field(default_factory=HiFTConfig)

    @classmethod
    def tiny(cls) -> "S3GenConfig":
        spk = CAMPPlusConfig.tiny()
        flow = FlowConfig.tiny()
        flow.spk_embed_dim = spk.embedding_size
        hift = HiFTConfig.tiny()
        hift.in_channels = flow.output_size
        return cls(S3TokenizerConfig.tiny(), spk, flow, hift)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None,
                        what: str = "S3Gen (s3gen.safetensors)") -> "S3GenConfig":
        """Sizes from the tensors of s3gen.safetensors; `overrides` is the whole checkpoint configuration
        (`checkpoint.read_config`; its sections "s3tokenizer", "campplus", "flow", "hift" are used)."""
        o = overrides or {}

        def part(config_cls, prefix: str, section: str):
            try:
                return config_cls.from_state_dict(_prefixed(sd, prefix), o.get(section))
            except CheckpointError:
                raise
            except KeyError as e:   # a tensor the sizes are read from is absent
                raise CheckpointError(f"{what}: 1 missing key(s): {prefix}{e.args[0]}") from None
            except (IndexError, ValueError, TypeError) as e:   # a tensor of the wrong rank, an impossible size
                raise CheckpointError(f"{what}, {prefix}*: not the expected tensors "
                                      f"({type(e).__name__}: {e})") from None

        return cls(part(S3TokenizerConfig, "tokenizer.", "s3tokenizer"),
                   part(CAMPPlusConfig, "speaker_encoder.", "campplus"),
                   part(FlowConfig, "flow.", "flow"), part(HiFTConfig, "mel2wav.", "hift"))


class S3Gen(nn.Module):
    def __init__(self, config: S3GenConfig):
        super().__init__()
        self.config = config
        self.tokenizer = S3TokenizerV2(config.tokenizer)
        self.speaker_encoder = CAMPPlus(config.speaker_encoder)
        self.flow = CausalMaskedDiffWithXvec(config.flow)
        self.mel2wav = HiFTGenerator(config.mel2wav)

    @property
    def sample_rate(self) -> int:
        return self.config.mel2wav.sampling_rate

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flow.input_embedding.weight.dtype

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None,
                        what: str = "S3Gen (s3gen.safetensors)") -> "S3Gen":
        """Build with sizes read from `sd`, load it strictly, fold HiFT's weight norm; eval mode."""
        try:
            config = S3GenConfig.from_state_dict(sd, overrides, what)
            model = cls(config)
        except ValueError as e:      # an impossible architecture (e.g. the meanflow solver without its estimator)
            raise CheckpointError(f"{what}: {e}") from None
        load_strict(model, sd, what=what)
        model.mel2wav.fold_weight_norm()
        return model.eval()

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, config: dict | None = None,
                        filename: str = "s3gen.safetensors") -> "S3Gen":
        """Load `filename` (the variant's S3Gen file) from a checkpoint directory. `config`: the checkpoint's
        configuration (`checkpoint.read_config`, read here when not given), with the variant's architecture
        merged in (e.g. "flow": {"solver": "meanflow", ...}; see engine/variants.py).
        `dtype` applies to the flow, and in bfloat16 to the vocoder's convolution stack too (`HiFTGenerator.convolve_in`:
        1.65x faster on an AMD Zen 4, waveform 38.6 dB SNR against float32 on full-size random weights); the
        tokenizer, speaker encoder, the vocoder's F0 predictor, sine source and STFTs stay in float32."""
        ckpt_dir = Path(ckpt_dir)
        overrides = read_config(ckpt_dir) if config is None else config
        path = ckpt_dir / filename
        with naming(path):
            model = cls.from_state_dict(read_weights(path), overrides, what=f"S3Gen ({filename})")
        model = model.to(device)
        model.flow.to(dtype)
        if dtype == torch.bfloat16:
            model.mel2wav.convolve_in(dtype)
        return model
