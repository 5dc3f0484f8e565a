"""Serving latency and throughput: the previous batch-at-once worker vs the engine core, same engine, one run.

    python bench/serving.py CKPT_DIR [--dtype bfloat16] [--compile] [--threads 2] [--tokens-per-chunk 60]
                            [--scenarios single,interference,poisson] [--poisson-seconds 180] [--rate R]
                            [--poisson-mixes whole,streamed] [--repeat N]

CKPT_DIR: a checkpoint in an official layout with full-size weights (e.g. a `../shared/reference` dump:
dump_reference.py --out /tmp/refs/a). Both modes drive the same loaded engine from one thread, as the worker
does, with the clock running while requests arrive:
- batch: what the worker did before the engine core: take up to --batch waiting requests, run
  `ChatterboxEngine.synthesize` on them (T3 for all, then S3Gen for all), and only then take more; streamed
  requests get their pieces through on_audio (between sentence chunks);
- core: `EngineCore` (engine/core.py): requests join between steps as they arrive (up to its free slots); each
  `step()` decodes one token for every row and runs at most one unit of S3Gen under the scheduler's budget.

Random weights almost never draw EOS, so every sentence chunk decodes --tokens-per-chunk tokens (the engine's
per-chunk bound): a 1-sentence request is that many tokens (25 per second of audio), an 8-sentence one 8 times.

Scenarios (each in both modes, figures side by side):
  single        one 1-sentence streamed request: time to first audio (TTFA) and total time
  interference  a 1-sentence request submitted while an 8-sentence request runs (at 25% of the long one's time
                alone): its latency over its latency alone
  poisson       Poisson arrivals of 1/2/4-sentence requests for --poisson-seconds (rate: --rate, default ~70% of
                the batch mode's measured capacity), once not streamed and once streamed: p50/p95 latency and
                TTFA, aggregate audio seconds per second of wall time (the price of streaming: streamed vs not),
                and T3's decoding steps with their mean rows (a step costs about the same for 2 rows as for 16 on
                a CPU: fewer, fuller steps are throughput). Where the wall time went: T3 seconds, the engine's busy
                seconds (in `synthesize` / `step`: T3, S3Gen, watermark), the process's CPU seconds, and the seconds
                the hypervisor stole from this machine's CPUs meanwhile (/proc/stat: noise from other tenants).
                --repeat N runs the two modes N times each, alternating which goes first (batch, core, core,
                batch, ...), and prints each mode's throughput over all its runs: on a shared machine the run-to-run
                noise can exceed the difference between the modes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine, params_for, peak_rss_mb  # noqa: E402  (bench/engine.py)

SENTENCES = ["Welcome to Chatterbox, where your text turns into captivating audio.",
             "The engine streams audio while it is still generating the rest.",
             "Short requests should not wait for long ones to finish first.",
             "Every sentence becomes one chunk of speech tokens for the decoder.",
             "The vocoder turns the tokens into a waveform at twenty four kilohertz.",
             "A watermark is added to every piece that leaves the server.",
             "Continuous batching lets new requests join between two steps.",
             "That is how a busy server keeps its latency low and steady."]


def text_of(n: int, offset: int = 0) -> str:
    return " ".join(SENTENCES[(offset + i) % len(SENTENCES)] for i in range(n))


@dataclasses.dataclass
class Arrival:
    at: float                 # seconds after the start
    sentences: int
    stream: bool
    seed: int
    rid: str = ""


@dataclasses.dataclass
class Record:
    rid: str
    arrived: float
    first_audio: float | None = None
    done: float | None = None
    audio_s: float = 0.0
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.arrived

    @property
    def ttfa(self) -> float:
        return (self.first_audio if self.first_audio is not None else self.done) - self.arrived


def request_of(engine, a: Arrival):
    from chatterbox_serverless.engine.contract import SynthesisRequest
    return SynthesisRequest(text_of(a.sentences, a.seed), params_for(engine.variant.name, a.seed), request_id=a.rid,
                            stream=a.stream)


def run_batch(engine, arrivals: list[Arrival], batch: int) -> dict[str, Record]:
    """The batch-at-once worker: waiting requests taken up to `batch` at once, each batch run to its end."""
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    todo = sorted(arrivals, key=lambda a: a.at)
    recs: dict[str, Record] = {}
    waiting: list[Arrival] = []

    def on_audio(rid, seq, samples):
        if recs[rid].first_audio is None:
            recs[rid].first_audio = now()

    busy = 0.0
    while todo or waiting:
        while todo and todo[0].at <= now():
            a = todo.pop(0)
            waiting.append(a)
            recs[a.rid] = Record(a.rid, a.at)
        if not waiting:
            time.sleep(min(0.01, max(0.0, todo[0].at - now())))
            continue
        take, waiting = waiting[:batch], waiting[batch:]
        t1 = time.perf_counter()
        results = engine.synthesize([request_of(engine, a) for a in take], on_audio=on_audio)
        busy += time.perf_counter() - t1
        for a, res in zip(take, results):
            r = recs[a.rid]
            r.done, r.error = now(), res.error
            r.audio_s = res.metrics.get("audio_seconds", 0.0) if res.error is None else 0.0
    return recs, busy


def run_core(engine, arrivals: list[Arrival], config=None) -> dict[str, Record]:
    """The engine core: arrivals added between steps while it has free slots."""
    from chatterbox_serverless.engine.core import AudioChunk, EngineCore, RequestFailed, RequestFinished
    core = EngineCore(engine, config)
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    todo = sorted(arrivals, key=lambda a: a.at)
    recs: dict[str, Record] = {}
    waiting: list[Arrival] = []

    def on_event(ev):
        r = recs[ev.request_id]
        if isinstance(ev, AudioChunk):
            if r.first_audio is None:
                r.first_audio = now()
        elif isinstance(ev, RequestFinished):
            r.done, r.audio_s = now(), ev.result.metrics["audio_seconds"]
        elif isinstance(ev, RequestFailed):
            r.done, r.error = now(), ev.error

    busy = 0.0
    while todo or waiting or core.has_unfinished():
        while todo and todo[0].at <= now():
            a = todo.pop(0)
            waiting.append(a)
            recs[a.rid] = Record(a.rid, a.at)
        while waiting and core.free_slots() > 0:
            core.add_request(request_of(engine, waiting.pop(0)))
        if core.has_unfinished():
            t1 = time.perf_counter()
            core.step(emit=on_event)
            busy += time.perf_counter() - t1
        elif todo:
            time.sleep(min(0.01, max(0.0, todo[0].at - now())))
    return recs, busy


def stolen_seconds() -> float:
    """CPU seconds the hypervisor gave to others since boot, all CPUs (/proc/stat 'steal'; 0 where unknown)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summary(recs: dict[str, Record]) -> dict:
    ok = [r for r in recs.values() if r.error is None]
    end = max(r.done for r in recs.values())
    start = min(r.arrived for r in recs.values())
    return {"requests": len(recs), "failed": len(recs) - len(ok),
            "latency_p50": pct([r.latency for r in ok], 0.5), "latency_p95": pct([r.latency for r in ok], 0.95),
            "ttfa_p50": pct([r.ttfa for r in ok], 0.5), "ttfa_p95": pct([r.ttfa for r in ok], 0.95),
            "audio_s": sum(r.audio_s for r in ok), "wall_s": end - start,
            "audio_s_per_s": sum(r.audio_s for r in ok) / max(1e-9, end - start)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="T3's decoding step through torch.compile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens-per-chunk", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="batch mode: requests per batch at most")
    ap.add_argument("--scenarios", default="single,interference,poisson")
    ap.add_argument("--modes", default="batch,core", help="which to run: batch, core (comma-separated)")
    ap.add_argument("--poisson-seconds", type=float, default=180.0)
    ap.add_argument("--poisson-mixes", default="whole,streamed", help="poisson: whole, streamed (comma-separated)")
    ap.add_argument("--repeat", type=int, default=1, help="poisson: runs of each mode, alternating which goes first")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: measured)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from chatterbox_serverless.engine.contract import SynthesisRequest
    from chatterbox_serverless.engine.pipeline import ChatterboxEngine
    engine = ChatterboxEngine(args.ckpt, device="cpu", dtype=args.dtype, compile=args.compile)
    engine.max_new_tokens = args.tokens_per_chunk
    engine.max_chunk_chars = max(len(x) for x in SENTENCES)     # one sentence, one chunk: an N-sentence request is N chunks
    model = engine.variant.name
    engine.synthesize([SynthesisRequest(text_of(1), params_for(model, 99))])          # warm-up (and the voice)
    print(f"# {machine()}; {model}, {args.dtype}{' + compile' if args.compile else ''}, {args.threads} threads, "
          f"{args.tokens_per_chunk} tokens per sentence chunk", flush=True)
    figures: dict = {}
    timed = {"batch": lambda arr: run_batch(engine, arr, args.batch), "core": lambda arr: run_core(engine, arr)}
    timed = {m: timed[m] for m in args.modes.split(",")}
    modes = {m: (lambda arr, f=f: f(arr)[0]) for m, f in timed.items()}      # the records alone
    scenarios = args.scenarios.split(",")

    if "single" in scenarios:
        for mode, run in modes.items():
            r = run([Arrival(0.0, 1, True, 1, "one")])["one"]
            figures[f"single/{mode}"] = {"ttfa": r.ttfa, "total": r.latency, "ttfa_over_total": r.ttfa / r.latency}
            print(f"single      {mode:5s}  TTFA {r.ttfa:6.2f} s  total {r.latency:6.2f} s  "
                  f"TTFA/total {r.ttfa / r.latency:5.2f}", flush=True)

    capacity = None
    if "interference" in scenarios or ("poisson" in scenarios and args.rate is None):
        for mode, run in modes.items():
            short_alone = run([Arrival(0.0, 1, False, 7, "short")])["short"].latency
            long_alone = run([Arrival(0.0, 8, False, 3, "long")])["long"]
            capacity = long_alone.audio_s / long_alone.latency if capacity is None else capacity
            if "interference" not in scenarios:
                break
            recs = run([Arrival(0.0, 8, False, 3, "long"), Arrival(0.25 * long_alone.latency, 1, False, 7, "short")])
            ratio = recs["short"].latency / short_alone
            figures[f"interference/{mode}"] = {"short_alone": short_alone, "short_under_load": recs["short"].latency,
                                               "ratio": ratio, "long_alone": long_alone.latency,
                                               "long_under_load": recs["long"].latency}
            print(f"interference {mode:5s}  1-sentence alone {short_alone:6.2f} s, beside an 8-sentence request "
                  f"{recs['short'].latency:6.2f} s ({ratio:4.2f}x); the 8-sentence one {long_alone.latency:6.2f} s "
                  f"alone, {recs['long'].latency:6.2f} s", flush=True)

    if "poisson" in scenarios:
        mean_audio = statistics.mean([1, 2, 4]) * args.tokens_per_chunk / 25.0
        rate = args.rate if args.rate is not None else 0.7 * capacity / mean_audio
        rng = random.Random(0)
        t, arrivals = 0.0, []
        while True:
            t += rng.expovariate(rate)
            if t > args.poisson_seconds:
                break
            arrivals.append((t, rng.choice([1, 2, 4]), rng.randrange(1 << 30)))
        print(f"poisson: {len(arrivals)} requests over {args.poisson_seconds:.0f} s ({rate:.3f}/s)", flush=True)
        if not arrivals:
            raise SystemExit("no arrivals: give a higher --rate or longer --poisson-seconds")
        for stream in [m == "streamed" for m in args.poisson_mixes.split(",")]:
            mix = "streamed" if stream else "whole"
            totals = {mode: [0.0, 0.0] for mode in timed}          # audio seconds, wall seconds over the runs
            for k in range(args.repeat):
                for mode in (list(timed) if k % 2 == 0 else list(timed)[::-1]):
                    arr = [Arrival(at, n, stream, seed, f"p{i}") for i, (at, n, seed) in enumerate(arrivals)]
                    d = engine.decoder
                    steps, row_steps, t3_s = d.steps_taken, d.row_steps, d.step_seconds
                    cpu, stolen = time.process_time(), stolen_seconds()
                    recs, busy = timed[mode](arr)
                    s = summary(recs)
                    s["cpu_s"], s["stolen_s"] = time.process_time() - cpu, stolen_seconds() - stolen
                    s["busy_s"] = busy
                    s["t3_steps"] = d.steps_taken - steps
                    s["t3_rows_per_step"] = (d.row_steps - row_steps) / max(1, s["t3_steps"])
                    s["t3_seconds"] = d.step_seconds - t3_s
                    totals[mode][0] += s["audio_s"]
                    totals[mode][1] += s["wall_s"]
                    figures[f"poisson/{mix}/{mode}" + (f"/{k}" if args.repeat > 1 else "")] = s
                    print(f"poisson {mix:8s} {mode:5s}  latency p50 {s['latency_p50']:6.2f} "
                          f"p95 {s['latency_p95']:6.2f} s  TTFA p50 {s['ttfa_p50']:6.2f} p95 {s['ttfa_p95']:6.2f} s  "
                          f"{s['audio_s_per_s']:.3f} audio s/s (wall {s['wall_s']:.0f} s, busy {busy:.0f} s, "
                          f"CPU {s['cpu_s']:.0f} s, stolen {s['stolen_s']:.0f} s)  T3 {s['t3_steps']} steps of "
                          f"{s['t3_rows_per_step']:.1f} rows, {s['t3_seconds']:.0f} s ({s['failed']} failed)", flush=True)
            if args.repeat > 1:
                rates = {mode: a / max(1e-9, w) for mode, (a, w) in totals.items()}
                figures[f"poisson/{mix}/audio_s_per_s"] = rates
                print(f"poisson {mix:8s} over {args.repeat} runs each: " + ", ".join(
                    f"{mode} {rate:.3f} audio s/s" for mode, rate in rates.items()), flush=True)
    figures["peak_rss_mb"] = peak_rss_mb()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
