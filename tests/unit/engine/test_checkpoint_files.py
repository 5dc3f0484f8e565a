"""Checkpoint files: checkpoint.py is a leaf module, the engine's config file is read in one place, and every
file that is not what it should be raises CheckpointError naming it (never a bare KeyError / SafetensorError)."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import chatterbox_serverless.engine as engine_pkg
from chatterbox_serverless.engine.checkpoint import CONFIG_FILE, CheckpointError, read_config, read_safetensors
from chatterbox_serverless.engine.pipeline import ChatterboxEngine, load_engine
from chatterbox_serverless.engine.resolve import resolve_checkpoint
from chatterbox_serverless.engine.tiny import write_tiny_checkpoint

ENGINE = Path(engine_pkg.__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-random")


@pytest.fixture
def ckpt(tiny, tmp_path):
    """A fresh copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def load(ckpt):
    return ChatterboxEngine(ckpt, device="cpu", watermark=False)


# ------------------------------------------------------------------------------------------- module structure

def test_checkpoint_module_imports_nothing_from_the_package():
    tree = ast.parse((ENGINE / "checkpoint.py").read_text())
    for node in ast.walk(tree):                       # function-level imports included
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import from {node.module!r} at line {node.lineno}"
            assert not (node.module or "").startswith("chatterbox_serverless"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("chatterbox_serverless") for a in node.names)
    # and importing it loads no other engine module
    code = ("import sys, chatterbox_serverless.engine.checkpoint\n"
            "print(sorted(m for m in sys.modules if m.startswith('chatterbox_serverless.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["chatterbox_serverless.engine", "chatterbox_serverless.engine.checkpoint"]


def test_tiny_random_is_resolved_above_the_checkpoint_module(tmp_path):
    import chatterbox_serverless.engine.checkpoint as checkpoint
    assert not hasattr(checkpoint, "resolve_checkpoint") and not hasattr(checkpoint, "TINY")
    target = resolve_checkpoint("tiny-random", tmp_path)
    assert target == tmp_path / "tiny-random" and (target / "conds.pt").is_file()
    assert load_engine("tiny-random", data_dir=tmp_path, device="cpu", watermark=False).sample_rate == 24000


def _json_readers(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("load", "loads")
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "json" for n in ast.walk(tree))


def test_the_config_file_is_read_in_one_place():
    readers = sorted(str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py") if _json_readers(p))
    assert readers == ["checkpoint.py", "parity.py"]             # parity.py reads the reference's reference.json
    assert "reference.json" in (ENGINE / "parity.py").read_text()
    mentions = []
    for p in ENGINE.rglob("*.py"):                               # the file name, as code (docstrings aside)
        tree = ast.parse(p.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        mentions += [p.name for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs
                     and isinstance(n.value, str) and "serverless_config" in n.value]
    assert mentions == ["checkpoint.py"]


def test_malformed_config_file_is_a_checkpoint_error_naming_it(ckpt):
    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not valid JSON"):
        load(ckpt)
    (ckpt / CONFIG_FILE).write_text(json.dumps(["a", "list"]))
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        read_config(ckpt)
    (ckpt / CONFIG_FILE).unlink()
    assert read_config(ckpt) == {}


# ----------------------------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("content", [{"some.other.weight": torch.zeros(3)}, {}], ids=["wrong-keys", "no-keys"])
def test_voice_encoder_file_with_wrong_keys_names_the_file(ckpt, content):
    save_file(content, str(ckpt / "ve.safetensors"))
    with pytest.raises(CheckpointError, match=r"ve\.safetensors.*missing key.*lstm\."):
        load(ckpt)


def test_voice_encoder_file_missing_one_tensor_names_file_and_key(ckpt):
    sd = load_file(str(ckpt / "ve.safetensors"))
    del sd["proj.weight"]
    save_file(sd, str(ckpt / "ve.safetensors"))
    with pytest.raises(CheckpointError, match=r"ve\.safetensors.*proj\.weight"):
        load(ckpt)


def test_voice_encoder_tensor_of_the_wrong_rank_names_the_file(ckpt):
    sd = load_file(str(ckpt / "ve.safetensors"))
    sd["lstm.weight_hh_l0"] = torch.zeros(7)
    save_file(sd, str(ckpt / "ve.safetensors"))
    with pytest.raises(CheckpointError, match=r"ve\.safetensors"):
        load(ckpt)


@pytest.mark.parametrize("name", ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "conds.pt",
                                  "tokenizer.json"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_checkpoint_files_name_the_file(ckpt, name, damage):
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes({"garbage": b"this is not a checkpoint file " * 50, "truncated": data[:len(data) // 2],
                               "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(ckpt)


@pytest.mark.parametrize("name", ["t3_cfg.safetensors", "s3gen.safetensors"])
def test_model_files_with_wrong_keys_name_the_file(ckpt, name):
    save_file({"some.other.weight": torch.zeros(3)}, str(ckpt / name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(ckpt)


def test_a_safetensors_file_where_torch_data_belongs_names_it(ckpt):
    save_file({"t3": torch.zeros(3)}, str(ckpt / "conds.pt"))
    with pytest.raises(CheckpointError, match=r"conds\.pt"):
        load(ckpt)


def test_read_safetensors_reads_all_or_prefixed_tensors(ckpt):
    everything = read_safetensors(ckpt / "s3gen.safetensors")
    some = read_safetensors(ckpt / "s3gen.safetensors", ("tokenizer.",))
    assert some and set(some) == {k for k in everything if k.startswith("tokenizer.")}
    with pytest.raises(CheckpointError, match="absent.safetensors is missing"):
        read_safetensors(ckpt / "absent.safetensors")
