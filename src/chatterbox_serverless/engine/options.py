"""Engine options shared by the commands that load an engine (`serve`, `worker`). Cheap to import."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_engine_arguments(parser) -> None:
    a = parser.add_argument
    a("--model", default=os.environ.get("CHATTERBOX_MODEL", "ResembleAI/chatterbox"),
      help="Hugging Face repo id (ResembleAI/chatterbox, ResembleAI/chatterbox-turbo), checkpoint directory (the "
           "model is recognised from its files), tiny-random or tiny-random-turbo (default ResembleAI/chatterbox)")
    a("--device", default=os.environ.get("CHATTERBOX_DEVICE", "auto"), help="cpu, cuda, cuda:N or auto (default auto)")
    a("--dtype", default=os.environ.get("CHATTERBOX_DTYPE", "float32"), choices=("float32", "bfloat16", "float16"),
      help="T3 and flow-matching precision: float32 (default, exact parity with the official pipeline), "
           "bfloat16 (CUDA, or CPUs with AMX or AVX512-BF16; faster, not bit-exact), float16 (CUDA)")
    a("--compile", action="store_true", default=os.environ.get("CHATTERBOX_COMPILE", "") not in ("", "0"),
      help="compile T3's decoding step with torch.compile at start-up (about a minute; 1.4x to 1.9x faster decoding "
           "in bfloat16 on CPU; needs a C++ compiler on CPU)")
    a("--no-watermark", action="store_true", help="do not apply the Perth watermark (operator's choice)")
    a("--voice-cache", type=int, default=64, help="voices whose conditionals are kept in memory (default 64)")


def engine_from_args(args, data_dir: str | Path, prog: str):
    """Load the engine the arguments name; on a checkpoint problem print one sentence and return None."""
    from .checkpoint import CheckpointError
    from .pipeline import load_engine
    try:
        return load_engine(args.model, data_dir=Path(data_dir), device=None if args.device == "auto" else args.device,
                           dtype=args.dtype, watermark=not args.no_watermark, voice_cache_size=args.voice_cache,
                           compile=args.compile)
    except (CheckpointError, ValueError) as e:
        print(f"chatterbox-serverless {prog}: {e}", file=sys.stderr)
        return None
