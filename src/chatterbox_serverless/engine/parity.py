"""`chatterbox-serverless parity REFERENCE_DIR`: run this engine on the inputs recorded by the official
implementation (shared/reference/dump_reference.py) and compare every recorded tensor.

The variant (original, turbo, multilingual) is recognised from the dump: its checkpoint files
(engine/variants.py) and the `model` of reference.json must agree; each stage then runs with that variant's parts
(Turbo: the -27 LUFS front end and `cond.ref_lufs`, GPT-2 T3 without CFG and its sampling chain, the 2-step
meanflow flow; Multilingual: ve.pt and s3gen.pt, the text in the recorded `language`, and `t3.alignment`, the
alignment analyser's rows, its stop-token decisions being part of `t3.probs`).

Where the official run drew random numbers, the recorded ones are fed in (T3 is teacher-forced with the
recorded tokens; the flow gets the recorded noise, the vocoder the recorded excitation). Each stage's part lives
beside its code as `parity_outputs(ckpt_dir, ref, meta) -> {name: tensor}`; this module only compares.
Exit status 1 when any tensor is above tolerance (relative error = max |ours - theirs| / max |theirs|), or
when a recorded tensor has no counterpart.

The sampled distributions (`t3.probs`) are cut by min_p: a token whose probability lies at the cutoff (within
the tolerance) may be kept by one implementation and dropped by the other, from logits equal to 1e-6. Such a
token is reported, not failed; the distributions are then compared on the tokens both kept, each renormalised.
Any other difference in which tokens were kept fails.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STAGES = (  # (module with parity_outputs, names of the recorded tensors it covers)
    ("chatterbox_serverless.engine.conditioning", ("cond.",)),
    ("chatterbox_serverless.engine.t3_decoder", ("t3.",)),
    ("chatterbox_serverless.engine.speech_to_wav", ("flow.mel", "hift.", "out.")),
)
INPUT_ONLY = {"t3.tokens", "flow.tokens", "flow.noise", "hift.source"}   # recorded randomness / inputs we feed
REL_TOL = 1e-4
MIN_P_CUT = {"t3.probs": "min_p"}      # distributions cut at min_p x max probability -> the parameter's name
CUT_BY_MIN_P = {"original", "multilingual"}   # the variants whose sampling chain has min_p


def compare(ours: "torch.Tensor", theirs: "torch.Tensor") -> tuple[float, float, bool]:
    """(max abs error, relative error, ok). Integer tensors (token ids) must be identical."""
    if ours.shape != theirs.shape:
        return float("inf"), float("inf"), False
    if not theirs.is_floating_point():
        n_diff = int((ours.long() != theirs.long()).sum())
        return float(n_diff), float(n_diff), n_diff == 0
    diff = (ours.double() - theirs.double()).abs().max().item() if theirs.numel() else 0.0
    scale = theirs.double().abs().max().item() if theirs.numel() else 0.0
    rel = diff / scale if scale > 0 else diff
    return diff, rel, rel <= REL_TOL


def compare_cut_distribution(ours: "torch.Tensor", theirs: "torch.Tensor", min_p: float
                             ) -> tuple[float, float, bool, list[tuple[int, int]]]:
    """`compare` for (S, V) distributions cut at min_p: also returns the (step, token) pairs kept by one side
    only at the cutoff (p / max p within REL_TOL of min_p on the side that kept it: the ratio survives the
    renormalisation). Those are excluded, each side renormalised over the tokens both kept, then compared."""
    if ours.shape != theirs.shape:
        return float("inf"), float("inf"), False, []
    ours, theirs = ours.double(), theirs.double()
    flipped = (ours > 0) != (theirs > 0)
    at_cut = []
    for s, v in flipped.nonzero().tolist():
        kept = ours if ours[s, v] > 0 else theirs
        ratio = (kept[s, v] / kept[s].max()).item()
        if abs(ratio / min_p - 1) > REL_TOL:
            return float("inf"), float("inf"), False, []
        at_cut.append((s, v))
    both = (ours > 0) & (theirs > 0)
    renorm = [(x * both) / (x * both).sum(dim=-1, keepdim=True) for x in (ours, theirs)]
    diff, rel, ok = compare(*renorm)
    return diff, rel, ok, at_cut


def read_dump(ref_dir: Path) -> tuple[dict, dict]:
    """A reference dump's recorded tensors (reference.safetensors) and inputs (reference.json)."""
    from safetensors.torch import load_file
    ref_dir = Path(ref_dir)
    return load_file(str(ref_dir / "reference.safetensors")), json.loads((ref_dir / "reference.json").read_text())


def run_parity(ref_dir: Path, out=sys.stdout) -> bool:
    import torch
    ref, meta = read_dump(ref_dir)
    if meta.get("model") == "vc":   # S3Gen only: engine/vc.py runs and compares every recorded tensor
        from .vc import run_vc_parity
        return run_vc_parity(ref_dir, out=out).ok
    from .checkpoint import CheckpointError
    from .variants import detect_variant
    recorded = str(meta.get("model", "original"))
    try:
        variant = detect_variant(ref_dir).name
    except CheckpointError as e:
        print(f"{e}\nPARITY FAILED", file=out)
        return False
    print(f"variant: {variant} (reference.json: {recorded}, {meta.get('package', 'package unknown')})", file=out)
    if variant != recorded:
        print(f"the dump was made with --model {recorded}, its files are a {variant} checkpoint\nPARITY FAILED",
              file=out)
        return False
    ok = True
    covered: set[str] = set()
    print(f"{'tensor':<24} {'shape':<18} {'max abs err':>12} {'rel err':>10}  result", file=out)
    for modname, prefixes in STAGES:
        names = [k for k in ref if k.startswith(prefixes) and k not in INPUT_ONLY]
        module = importlib.import_module(modname)
        with torch.inference_mode():
            ours = module.parity_outputs(ref_dir, ref, meta)
        for name in names:
            covered.add(name)
            if name not in ours:
                print(f"{name:<24} {'':<18} {'':>12} {'':>10}  MISSING", file=out)
                ok = False
                continue
            at_cut = []
            if name in MIN_P_CUT and variant in CUT_BY_MIN_P:
                diff, rel, good, at_cut = compare_cut_distribution(ours[name].detach().cpu(), ref[name],
                                                                   float(meta.get(MIN_P_CUT[name], 0.05)))
            else:
                diff, rel, good = compare(ours[name].detach().cpu(), ref[name])
            ok &= good
            kind = f"{rel:10.2e}" if ref[name].is_floating_point() else ("identical" if good else f"{int(diff)} differ")
            print(f"{name:<24} {str(tuple(ref[name].shape)):<18} {diff:12.3e} {kind:>10}  {'ok' if good else 'FAIL'}",
                  file=out)
            for step, token in at_cut:
                print(f"{'':<24} step {step}, token {token}: at the min_p cutoff (kept by one side only)", file=out)
    for name in sorted(set(ref) - covered - INPUT_ONLY):
        print(f"{name:<24} not covered by any stage", file=out)
        ok = False
    print("PARITY OK" if ok else "PARITY FAILED", file=out)
    return ok


def add_arguments(parser) -> None:
    parser.add_argument("reference_dir", type=Path, help="a directory written by shared/reference/dump_reference.py")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return 0 if run_parity(args.reference_dir) else 1
