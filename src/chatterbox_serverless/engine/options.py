"""Engine options shared by the commands that load an engine (`serve`, `worker`). Cheap to import.

`--model SPEC` may be given several times (environment: CHATTERBOX_MODEL, a comma-separated list): one engine per
spec, in order, each serving its API model (engine/catalog.py); the first is the default model. Two specs that
serve the same API model are refused. An API replica that loads nothing (`serve --workers 0`) names the models
it serves from the specs alone (`served_models_of_specs`): a spec whose model cannot be told without the hub
must say it with `VARIANT=SOURCE`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_SPEC = "ResembleAI/chatterbox"


def add_engine_arguments(parser) -> None:
    a = parser.add_argument
    a("--model", action="append", default=None, metavar="SPEC",
      help="[VARIANT=]SOURCE, once per model served (the first is the default model): a Hugging Face repo id "
           "(ResembleAI/chatterbox, ResembleAI/chatterbox-turbo), a checkpoint directory (the model is recognised "
           "from its files), or tiny-random[-turbo|-multilingual|-vc]; VARIANT= (original, turbo, multilingual, "
           "vc) names the model where the files cannot tell, e.g. multilingual=ResembleAI/chatterbox. "
           "Environment: CHATTERBOX_MODEL, comma-separated (default ResembleAI/chatterbox)")
    a("--device", default=os.environ.get("CHATTERBOX_DEVICE", "auto"), help="cpu, cuda, cuda:N or auto (default auto)")
    a("--dtype", default=os.environ.get("CHATTERBOX_DTYPE", "float32"), choices=("float32", "bfloat16", "float16"),
      help="T3 and flow-matching precision: float32 (default, exact parity with the official pipeline), "
           "bfloat16 (CUDA, or CPUs with AMX or AVX512-BF16; faster, not bit-exact), float16 (CUDA)")
    a("--compile", action="store_true", default=os.environ.get("CHATTERBOX_COMPILE", "") not in ("", "0"),
      help="compile T3's decoding step with torch.compile at start-up (about a minute; 1.4x to 1.9x faster decoding "
           "in bfloat16 on CPU; needs a C++ compiler on CPU)")
    a("--no-watermark", action="store_true", help="do not apply the Perth watermark (operator's choice)")
    a("--voice-cache", type=int, default=64, help="voices whose conditionals are kept in memory (default 64)")


def model_specs(args) -> list[str]:
    """The --model specs, in order: the options given, else CHATTERBOX_MODEL's comma-separated list, else the
    original model."""
    specs = getattr(args, "model", None)
    if isinstance(specs, str):
        specs = [specs]
    specs = [s.strip() for s in specs or () if s and s.strip()]
    if not specs:
        specs = [s.strip() for s in os.environ.get("CHATTERBOX_MODEL", "").split(",") if s.strip()]
    return specs or [DEFAULT_SPEC]


def served_models_of_specs(specs: list[str]) -> list[str]:
    """The API model of each spec, without loading anything. ValueError (one sentence naming --model) for a spec
    whose model cannot be told from its name, or two specs serving one model."""
    from .catalog import API_MODELS, api_model_of_spec
    models: list[str] = []
    for spec in specs:
        model = api_model_of_spec(spec)      # ValueError for an unknown VARIANT=
        if model is None:
            raise ValueError(f"--model {spec!r}: which model it serves cannot be told without loading it; write "
                             f"VARIANT=SOURCE ({', '.join(API_MODELS)}), e.g. --model turbo={spec}")
        if model in models:
            raise ValueError(f"--model {specs[models.index(model)]!r} and --model {spec!r} both serve {model}; "
                             "give one checkpoint per model")
        models.append(model)
    return models


def engines_from_args(args, data_dir: str | Path, prog: str) -> list | None:
    """Load one engine per --model spec, in order; on a checkpoint problem, or two specs serving one model, print
    one sentence and return None (the command exits 2)."""
    from .catalog import api_model_of_spec
    specs = model_specs(args)
    try:        # refused before anything is loaded, where the names tell
        known = {}
        for spec in specs:
            model = api_model_of_spec(spec)
            if model is not None and model in known:
                raise ValueError(f"--model {known[model]!r} and --model {spec!r} both serve {model}; "
                                 "give one checkpoint per model")
            if model is not None:
                known[model] = spec
    except ValueError as e:
        print(f"chatterbox-serverless {prog}: {e}", file=sys.stderr)
        return None
    engines = []
    for spec in specs:
        engine = _load(spec, args, data_dir, prog)
        if engine is None:
            return None
        twin = next((i for i, e in enumerate(engines) if getattr(e, "model", None) == getattr(engine, "model", None)),
                    None)
        if twin is not None:
            print(f"chatterbox-serverless {prog}: --model {specs[twin]!r} and --model {spec!r} both serve "
                  f"{engine.model}; give one checkpoint per model", file=sys.stderr)
            return None
        engines.append(engine)
    return engines


def engine_from_args(args, data_dir: str | Path, prog: str):
    """The engine of the first --model spec; on a checkpoint problem print one sentence and return None."""
    return _load(model_specs(args)[0], args, data_dir, prog)


def _load(spec: str, args, data_dir: str | Path, prog: str):
    from .checkpoint import CheckpointError
    from .pipeline import load_engine
    try:
        return load_engine(spec, data_dir=Path(data_dir), device=None if args.device == "auto" else args.device,
                           dtype=args.dtype, watermark=not args.no_watermark, voice_cache_size=args.voice_cache,
                           compile=args.compile)
    except (CheckpointError, ValueError) as e:
        print(f"chatterbox-serverless {prog}: {e}", file=sys.stderr)
        return None
