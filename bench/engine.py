"""Engine speed on full-size weights: this engine vs the official chatterbox-tts package, same weights, one run.
The model is the checkpoint's (engine/variants.py recognises it from the files): the original (ChatterboxTTS) or
Turbo (ChatterboxTurboTTS: GPT-2 T3 without CFG, 2-step meanflow S3Gen, its own example text with a tag).

    python bench/engine.py CKPT_DIR [--tokens 50,140] [--concurrent 8] [--dtypes float32,bfloat16,bfloat16+compile]
                           [--threads 2]
                           [--official-python /tmp/chatterbox-refvenv/bin/python]

CKPT_DIR is a checkpoint in the official layout (e.g. /tmp/refs/a, or /tmp/refs/turbo-a for Turbo: full-size random
weights). Both sides use the checkpoint's built-in voice (conds.pt), the same text, the class's default sampling
(original: CFG, cfg_weight 0.5; Turbo: top_k 1000, top_p 0.95, no CFG), and decode up to --tokens speech
tokens per request (random weights almost never draw EOS, so both produce the same number; the counts are
printed). The official package runs in its own virtualenv in a subprocess (`T3.inference`, one request at a time:
it has no batching, so its aggregate rate at N concurrent requests is its single-request rate). Times include
the prefill; model loading and a short warm-up run are excluded on both sides. The engine keeps what does not
depend on the text per voice (T3Decoder's prefix cache), so its rows are measured on a decoder that has seen
the voice (a serving worker's steady state) and once on a fresh decoder ("new voice"). An engine variant is a
dtype, optionally with `+compile` (T3's decoding step through torch.compile; its compilation is part of the
excluded warm-up).

On a machine shared with other work, use --threads 1: with 2 threads on 2 busy cores, OpenMP barriers make
both sides many times slower and the figures meaningless.

Stages (one function each):
    t3_engine          this engine's T3: 1 request, then --concurrent requests decoded together
    t3_official        chatterbox-tts 0.1.7 `T3.inference`
    pipeline_engine    this engine's whole pipeline (text -> T3 -> S3Gen -> watermark): real-time factor for one
                       request, aggregate audio seconds per second for --concurrent requests, peak memory
    pipeline_official  chatterbox-tts 0.1.7 `ChatterboxTTS.generate`'s body with the same token bound
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

def machine() -> str:
    """The processor and the features that decide the bfloat16 speed (figures differ a lot between them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} CPUs"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "CPU")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    feats = [f for f, flag in (("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    return f"{name}, {os.cpu_count()} CPUs, {' + '.join(feats) or 'no bfloat16 instructions'}"


def peak_rss_mb() -> float:
    """Peak memory of this process: VmHWM, the high-water mark of this process image. Not getrusage's ru_maxrss:
    on Linux a child started by fork+exec inherits its parent's, so every child of a parent that has loaded
    models would report the parent's peak. (Its source is also sent to the official package's subprocess.)"""
    import resource
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TEXT = "Welcome to Chatterbox TTS, where your text turns into captivating audio effortlessly."
TURBO_TEXT = ("Hi there, Sarah here from MochaFone calling you back [chuckle], have you got one minute to chat "
              "about the billing issue?")      # the official Turbo example


def model_of(ckpt: Path) -> str:
    """The checkpoint's variant name (original, turbo)."""
    from chatterbox_serverless.engine.variants import detect_variant
    return detect_variant(ckpt).name


def text_for(model: str) -> str:
    return TURBO_TEXT if model == "turbo" else TEXT


def params_for(model: str, seed: int):
    """The official class's default sampling parameters (what its generate() uses)."""
    from chatterbox_serverless.engine.contract import SynthesisParams
    if model == "turbo":
        return SynthesisParams(temperature=0.8, top_p=0.95, repetition_penalty=1.2, seed=seed)  # top_k: 1000
    return SynthesisParams(seed=seed)

OFFICIAL_T3 = r"""
import json, sys, time, torch
import torch.nn.functional as F
from safetensors.torch import load_file
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.models.tokenizers import EnTokenizer
from chatterbox.tts import punc_norm
ckpt, tokens, text, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
t3 = T3()
t3.load_state_dict(load_file(ckpt + "/t3_cfg.safetensors"))
t3.eval()
conds = torch.load(ckpt + "/conds.pt", weights_only=True)["t3"]
ids = EnTokenizer(ckpt + "/tokenizer.json").text_to_tokens(punc_norm(text))
tt = torch.cat([ids, ids])
tt = F.pad(F.pad(tt, (1, 0), value=t3.hp.start_text_token), (0, 1), value=t3.hp.stop_text_token)
from chatterbox.models.t3.inference.t3_hf_backend import T3HuggingfaceBackend
stamps = []
_forward = T3HuggingfaceBackend.forward
def timed_forward(self, *a, **k):
    out = _forward(self, *a, **k)
    stamps.append(time.perf_counter())
    return out
T3HuggingfaceBackend.forward = timed_forward
def run(n):
    cond = T3Cond(**conds)           # a fresh one each call (inference caches the prompt embedding in it)
    torch.manual_seed(0)
    stamps.clear()
    t = time.perf_counter()
    out = t3.inference(t3_cond=cond, text_tokens=tt, max_new_tokens=n, temperature=0.8, cfg_weight=0.5,
                       repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    end = time.perf_counter()
    return {"tokens": out.shape[-1], "seconds": end - t, "prefill_s": stamps[0] - t, "decode_s": end - stamps[0],
            "decode_forwards": len(stamps) - 1}
run(3)
print("RESULT " + json.dumps(run(tokens)))
"""


OFFICIAL_T3_TURBO = r"""
import json, sys, time, torch
from chatterbox.tts_turbo import ChatterboxTurboTTS, punc_norm
ckpt, tokens, text, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
model = ChatterboxTurboTTS.from_local(ckpt, "cpu")
t3 = model.t3
ids = model.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids
stamps = []
_forward = type(t3.tfmr).forward
def timed_forward(self, *a, **k):
    out = _forward(self, *a, **k)
    stamps.append(time.perf_counter())
    return out
type(t3.tfmr).forward = timed_forward
def run(n):
    torch.manual_seed(0)
    stamps.clear()
    t = time.perf_counter()
    out = t3.inference_turbo(model.conds.t3, ids, temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2,
                             max_gen_len=n - 1)
    end = time.perf_counter()
    return {"tokens": out.shape[-1], "seconds": end - t, "prefill_s": stamps[0] - t, "decode_s": end - stamps[0],
            "decode_forwards": len(stamps) - 1}
run(3)
print("RESULT " + json.dumps(run(tokens)))
"""


def run_result(cmd: list[str]) -> dict:
    """Run a measuring subprocess (its own process: its own threads and peak memory); parse its RESULT line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"), timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def t3_official(ckpt: Path, tokens: int, threads: int, python: str) -> dict:
    model = model_of(ckpt)
    script = OFFICIAL_T3_TURBO if model == "turbo" else OFFICIAL_T3
    r = run_result([python, "-c", script, str(ckpt), str(tokens), text_for(model), str(threads)])
    return summarise(r["tokens"], r["seconds"], r["prefill_s"], r["decode_s"], r["decode_forwards"])


def summarise(tokens: int, seconds: float, prefill_s: float, decode_s: float, decoded: int,
              requests: int = 1) -> dict:
    """tok_s: tokens / total time (prefill included). decode_tok_s: tokens fed through the backbone after the
    prefill / the time after the prefill (the official loop also runs one forward after its last token)."""
    return {"requests": requests, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "prefill_s": prefill_s, "decode_tok_s": decoded / decode_s if decode_s > 0 else float("nan")}


def variant(spec: str) -> tuple[str, bool]:
    """'bfloat16+compile' -> ('bfloat16', True)."""
    dtype, _, flag = spec.partition("+")
    if flag not in ("", "compile"):
        raise SystemExit(f"unknown engine variant {spec!r} (dtype or dtype+compile)")
    return dtype, flag == "compile"


def load_engine_t3(ckpt: Path, spec: str):
    """The variant's T3 (sizes and architecture as the engine loads them), its sampling chain, the built-in voice's
    T3 conditioning and the bench text's ids."""
    import torch
    from chatterbox_serverless.engine.checkpoint import read_config
    from chatterbox_serverless.engine.models.t3 import T3
    from chatterbox_serverless.engine.variants import detect_variant
    dtype_name, compile = variant(spec)
    v = detect_variant(ckpt)
    model = T3.from_checkpoint(ckpt, dtype=getattr(torch, dtype_name), config=v.architecture(read_config(ckpt)),
                               filename=v.t3_file)
    if compile:
        model.tfmr.compile_decoding()        # compiled during t3_engine's warm-up
    conds = torch.load(ckpt / "conds.pt", weights_only=True)["t3"]
    text = v.load_text(ckpt)
    text_ids = text.encode(text.normalize(text_for(v.name)))
    return model, conds, text_ids, v


def t3_engine(model, conds, text_ids, tokens: int, concurrent: int, v) -> dict:
    from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request

    def requests(n, max_new):
        return [T3Request(text_ids=text_ids, speaker_emb=conds["speaker_emb"],
                          prompt_tokens=conds["cond_prompt_speech_tokens"],
                          params=params_for(v.name, i), max_new_tokens=max_new) for i in range(n)]

    def decoder(rows):
        return T3Decoder(model, max_rows=rows, chain=v.load_chain())

    out = {}
    warm = decoder(2 * concurrent)
    warm.run(requests(2, 3))                     # warm-up; leaves the voice's prefix in this decoder's cache
    cases = (("single, new voice", 1, decoder(2)), ("single", 1, warm), ("concurrent", concurrent, warm))
    for label, n, dec in cases:
        results = []
        t = time.perf_counter()
        for r in requests(n, tokens):
            dec.submit(r)
        dec.admit()                                                     # prefill of every request
        t_prefill = time.perf_counter()
        while dec.busy:
            results += dec.step()
        end = time.perf_counter()
        total = sum(len(r.generated) for r in results)
        out[label] = summarise(total, end - t, t_prefill - t, end - t_prefill, total - n, requests=n)
    return out


OFFICIAL_PIPELINE = r"""
import json, sys, time, torch
import torch.nn.functional as F
from chatterbox.tts import ChatterboxTTS, punc_norm
from chatterbox.models.s3tokenizer import drop_invalid_tokens
ckpt, text, threads = sys.argv[1], sys.argv[3], int(sys.argv[4])
counts = [int(n) for n in sys.argv[2].split(",")]
torch.set_num_threads(threads)
model = ChatterboxTTS.from_local(ckpt, "cpu")
def generate(n):
    # ChatterboxTTS.generate's body with max_new_tokens bounded (random weights almost never draw EOS)
    ids = model.tokenizer.text_to_tokens(punc_norm(text))
    tt = torch.cat([ids, ids])
    tt = F.pad(F.pad(tt, (1, 0), value=model.t3.hp.start_text_token), (0, 1), value=model.t3.hp.stop_text_token)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.inference_mode():
        speech = model.t3.inference(t3_cond=model.conds.t3, text_tokens=tt, max_new_tokens=n, temperature=0.8,
                                    cfg_weight=0.5, repetition_penalty=1.2, min_p=0.05, top_p=1.0)[0]
        speech = drop_invalid_tokens(speech)
        speech = speech[speech < 6561]
        t_t3 = time.perf_counter()
        wav, _ = model.s3gen.inference(speech_tokens=speech, ref_dict=model.conds.gen)
        wav = wav.squeeze(0).numpy()
        t_s3 = time.perf_counter()
        out = model.watermarker.apply_watermark(wav, sample_rate=model.sr)
    end = time.perf_counter()
    return {"seconds": end - t, "t3_s": t_t3 - t, "s3gen_s": t_s3 - t_t3, "watermark_s": end - t_s3,
            "audio_s": len(out) / model.sr, "speech_tokens": int(speech.numel())}
generate(3)
r = {str(n): generate(n) for n in counts}
r["peak_rss_mb"] = peak_rss_mb()
print("RESULT " + json.dumps(r))
"""


OFFICIAL_PIPELINE_TURBO = r"""
import json, sys, time, torch
from chatterbox.tts_turbo import ChatterboxTurboTTS, punc_norm
from chatterbox.models.s3gen.const import S3GEN_SIL
ckpt, text, threads = sys.argv[1], sys.argv[3], int(sys.argv[4])
counts = [int(n) for n in sys.argv[2].split(",")]
torch.set_num_threads(threads)
model = ChatterboxTurboTTS.from_local(ckpt, "cpu")
def generate(n):
    # ChatterboxTurboTTS.generate's body with the token bound (random weights almost never draw EOS)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.inference_mode():
        ids = model.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids
        speech = model.t3.inference_turbo(t3_cond=model.conds.t3, text_tokens=ids, temperature=0.8, top_k=1000,
                                          top_p=0.95, repetition_penalty=1.2, max_gen_len=n - 1)
        speech = speech[speech < 6561]
        speech = torch.cat([speech, torch.tensor([S3GEN_SIL, S3GEN_SIL, S3GEN_SIL]).long()])
        t_t3 = time.perf_counter()
        wav, _ = model.s3gen.inference(speech_tokens=speech, ref_dict=model.conds.gen, n_cfm_timesteps=2)
        wav = wav.squeeze(0).detach().cpu().numpy()
        t_s3 = time.perf_counter()
        out = model.watermarker.apply_watermark(wav, sample_rate=model.sr)
    end = time.perf_counter()
    return {"seconds": end - t, "t3_s": t_t3 - t, "s3gen_s": t_s3 - t_t3, "watermark_s": end - t_s3,
            "audio_s": len(out) / model.sr, "speech_tokens": int(speech.numel()) - 3}
generate(3)
r = {str(n): generate(n) for n in counts}
r["peak_rss_mb"] = peak_rss_mb()
print("RESULT " + json.dumps(r))
"""


def pipeline_official(ckpt: Path, tokens: list[int], threads: int, python: str) -> dict:
    """chatterbox-tts 0.1.7, the whole `generate` (T3 -> S3Gen -> watermark) for one request, built-in voice, once
    per token bound: {"50": {...}, ..., "peak_rss_mb": ...}."""
    model = model_of(ckpt)
    script = inspect.getsource(peak_rss_mb) + (OFFICIAL_PIPELINE_TURBO if model == "turbo" else OFFICIAL_PIPELINE)
    return run_result([python, "-c", script, str(ckpt), ",".join(map(str, tokens)), text_for(model), str(threads)])


def pipeline_engine(ckpt: Path, tokens: list[int], concurrent: int, spec: str) -> dict:
    """This engine's whole pipeline (ChatterboxEngine.synthesize, watermark on): for each token bound, one request,
    then `concurrent` requests in one batch (different seeds, as concurrent clients would send):
    {"50": {"single": ..., "concurrent": ...}, ..., "peak_rss_mb": ...}."""
    from chatterbox_serverless.engine.pipeline import ChatterboxEngine
    from chatterbox_serverless.engine.contract import SynthesisRequest

    dtype_name, compile = variant(spec)
    engine = ChatterboxEngine(ckpt, device="cpu", dtype=dtype_name, compile=compile)
    model, text = engine.variant.name, text_for(engine.variant.name)
    engine.max_new_tokens = max(tokens)
    engine.synthesize([SynthesisRequest(text, params_for(model, 99))])        # warm-up
    out = {}
    for bound in tokens:
        engine.max_new_tokens = bound         # the same bound as the official run (random weights rarely stop)
        out[str(bound)] = {}
        for label, n in (("single", 1), ("concurrent", concurrent)):
            reqs = [SynthesisRequest(text, params_for(model, i)) for i in range(n)]
            t = time.perf_counter()
            results = engine.synthesize(reqs)
            seconds = time.perf_counter() - t
            bad = [r.error for r in results if r.error]
            if bad:
                raise RuntimeError(f"engine failed: {bad[0]}")
            m = results[0].metrics
            out[str(bound)][label] = {
                "requests": n, "seconds": seconds, "audio_s": sum(r.metrics["audio_seconds"] for r in results),
                "speech_tokens": sum(r.metrics["speech_tokens"] for r in results),
                "t3_s": m["t3_s"], "s3gen_s": m["s3gen_s"], "watermark_s": m["watermark_s"]}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def print_pipeline(rows, official, bound: int, args) -> None:
    print(f"\nWhole pipeline (text -> T3 -> S3Gen -> watermark), {args.ckpt} ({model_of(args.ckpt)}), built-in voice, {bound} speech "
          f"tokens/request, {args.threads} threads, {machine()}")
    print("RTF: compute seconds per audio second (lower is faster); audio s/s: aggregate audio seconds per second;\n"
          "T3 x, S3Gen x: the official's seconds per audio second in that stage / the engine's (at N requests, the\n"
          "stage's time for the whole batch)")
    print(f"{'implementation':28s} {'requests':>15s} {'audio s':>8s} {'seconds':>8s} {'T3 s':>7s} {'S3Gen s':>8s} "
          f"{'wm s':>6s} {'RTF':>6s} {'audio s/s':>9s} {'x official':>10s} {'T3 x':>6s} {'S3Gen x':>7s} "
          f"{'peak RSS MB':>11s}")
    for name, n, r, rss in rows:
        rate = r["audio_s"] / r["seconds"]
        ratio = stage = s3 = "-"
        if official:
            ratio = f"{rate / (official['audio_s'] / official['seconds']):.2f}x"
            stage = f"{(official['t3_s'] / official['audio_s']) / (r['t3_s'] / r['audio_s']):.2f}x"
            s3 = f"{(official['s3gen_s'] / official['audio_s']) / (r['s3gen_s'] / r['audio_s']):.2f}x"
        print(f"{name:28s} {n:>15s} {r['audio_s']:8.2f} {r['seconds']:8.2f} {r['t3_s']:7.2f} {r['s3gen_s']:8.2f} "
              f"{r['watermark_s']:6.2f} {r['seconds'] / r['audio_s']:6.2f} {rate:9.3f} {ratio:>10s} {stage:>6s} "
              f"{s3:>7s} {rss:11.0f}")


def pipeline_engine_child(args) -> None:
    """Runs in its own process (so its peak memory is its own) and prints a RESULT line."""
    import torch
    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(pipeline_engine(args.ckpt, args.tokens, args.concurrent, args.child_pipeline)))


def run_pipeline_stage(args) -> None:
    official = engines = None
    if args.official_python:
        official = pipeline_official(args.ckpt, args.tokens, args.threads, args.official_python)
    engines = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        cmd = [sys.executable, __file__, str(args.ckpt), "--tokens", ",".join(map(str, args.tokens)),
               "--concurrent", str(args.concurrent), "--threads", str(args.threads), "--child-pipeline", dtype]
        engines[dtype] = run_result(cmd)
    for bound in map(str, args.tokens):
        rows, off = [], official[bound] if official else None
        if off:
            rows.append(("official 0.1.7 (fp32)", "1", off, official["peak_rss_mb"]))
            rows.append(("official 0.1.7 (fp32)", f"{args.concurrent} (sequential)",
                         {**off, "audio_s": off["audio_s"] * args.concurrent, "seconds": off["seconds"] * args.concurrent,
                          "t3_s": off["t3_s"] * args.concurrent, "s3gen_s": off["s3gen_s"] * args.concurrent,
                          "watermark_s": off["watermark_s"] * args.concurrent}, official["peak_rss_mb"]))
        for dtype, r in engines.items():
            rows.append((f"engine ({dtype})", "1", r[bound]["single"], r["peak_rss_mb"]))
            rows.append((f"engine ({dtype})", str(args.concurrent), r[bound]["concurrent"], r["peak_rss_mb"]))
        print_pipeline(rows, off, int(bound), args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--tokens", type=lambda v: [int(n) for n in v.split(",")], default=[50, 140],
                    help="speech tokens per request, one or more bounds (comma-separated; 25 per second of audio). "
                         "The default measures a short clip (50: 2 s, where S3Gen's fixed cost for the 10 s voice "
                         "prompt dominates) and the bench sentence at a natural length (140: ~5.6 s, as real "
                         "weights would say its 85 characters at ~15 characters/s)")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16,bfloat16+compile",
                    help="engine variants to measure (comma-separated): a dtype, optionally +compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--official-python", default="/tmp/chatterbox-refvenv/bin/python",
                    help="python of a virtualenv with chatterbox-tts installed ('' to skip the official run)")
    ap.add_argument("--stages", default="t3,pipeline", help="what to measure: t3, pipeline (comma-separated)")
    ap.add_argument("--child-pipeline", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_pipeline:
        return pipeline_engine_child(args)
    stages = args.stages.split(",")
    if "t3" in stages:
        run_t3_stage(args)
    if "pipeline" in stages:
        run_pipeline_stage(args)


def run_t3_stage(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    officials, engines = {}, {}
    if args.official_python:
        officials = {n: t3_official(args.ckpt, n, args.threads, args.official_python) for n in args.tokens}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        model, conds, text_ids, v = load_engine_t3(args.ckpt, dtype)
        with torch.inference_mode():
            engines[dtype] = {n: t3_engine(model, conds, text_ids, n, args.concurrent, v) for n in args.tokens}
        del model
    for bound in args.tokens:
        rows, official = [], officials.get(bound)
        if official:
            rows.append(("official 0.1.7 (fp32)", "1", official))
            rows.append(("official 0.1.7 (fp32)", f"{args.concurrent} (sequential)",
                         {**official, "requests": args.concurrent, "tokens": official["tokens"] * args.concurrent,
                          "seconds": official["seconds"] * args.concurrent,
                          "prefill_s": official["prefill_s"] * args.concurrent}))
        for dtype, per_bound in engines.items():
            r = per_bound[bound]
            rows.append((f"engine ({dtype})", "1 (new voice)", r["single, new voice"]))
            rows.append((f"engine ({dtype})", "1", r["single"]))
            rows.append((f"engine ({dtype})", str(args.concurrent), r["concurrent"]))
        print(f"\nT3 speech tokens/s, {args.ckpt} ({model_of(args.ckpt)}), {bound} tokens/request, "
              f"{'no CFG' if model_of(args.ckpt) == 'turbo' else 'CFG on'}, "
              f"{args.threads} threads, {machine()}, torch {torch.__version__}")
        print("tokens/s: all tokens / total time (prefill included); decode tokens/s: after the prefill")
        print(f"{'implementation':28s} {'requests':>15s} {'tokens':>6s} {'seconds':>8s} {'prefill s':>9s} "
              f"{'tokens/s':>9s} {'x official':>10s} {'decode tok/s':>12s} {'x official':>10s}")
        for name, n, r in rows:
            ratio = f"{r['tok_s'] / official['tok_s']:.2f}x" if official else "-"
            dratio = f"{r['decode_tok_s'] / official['decode_tok_s']:.2f}x" if official else "-"
            print(f"{name:28s} {n:>15s} {r['tokens']:6d} {r['seconds']:8.2f} {r['prefill_s']:9.2f} "
                  f"{r['tok_s']:9.2f} {ratio:>10s} {r['decode_tok_s']:12.2f} {dratio:>10s}")


if __name__ == "__main__":
    main()
