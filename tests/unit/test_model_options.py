"""`--model` given several times (engine/options.py): the specs in order, CHATTERBOX_MODEL as a comma-separated
list, the models an API without engines serves, and two specs for one model refused in one sentence."""
from __future__ import annotations

import argparse

import pytest

from chatterbox_serverless.engine.options import (add_engine_arguments, engines_from_args, model_specs,
                                                  served_models_of_specs)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    return p.parse_args(list(argv))


def test_specs_come_from_the_options_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv("CHATTERBOX_MODEL", raising=False)
    assert model_specs(parse()) == ["ResembleAI/chatterbox"]
    assert model_specs(parse("--model", "tiny-random", "--model", "tiny-random-turbo")) == \
        ["tiny-random", "tiny-random-turbo"]
    monkeypatch.setenv("CHATTERBOX_MODEL", "tiny-random-turbo, multilingual=ResembleAI/chatterbox")
    assert model_specs(parse()) == ["tiny-random-turbo", "multilingual=ResembleAI/chatterbox"]
    assert model_specs(parse("--model", "tiny-random")) == ["tiny-random"]         # the option wins


def test_served_models_from_specs_alone():
    assert served_models_of_specs(["ResembleAI/chatterbox", "tiny-random-turbo", "vc=ResembleAI/chatterbox",
                                   "multilingual=ResembleAI/chatterbox"]) == \
        ["chatterbox-tts", "chatterbox-turbo", "chatterbox-vc", "chatterbox-multilingual"]
    with pytest.raises(ValueError, match=r"--model 'someone/fine-tune': .*VARIANT=SOURCE"):
        served_models_of_specs(["someone/fine-tune"])
    with pytest.raises(ValueError, match=r"'tiny-random' and --model 'ResembleAI/chatterbox' both serve "
                                         r"chatterbox-tts"):
        served_models_of_specs(["tiny-random", "ResembleAI/chatterbox"])
    with pytest.raises(ValueError, match="'fast' is not a model variant"):
        served_models_of_specs(["fast=tiny-random"])


def test_two_specs_of_one_model_load_nothing(tmp_path, capsys):
    args = parse("--model", "tiny-random-turbo", "--model", "ResembleAI/chatterbox-turbo", "--device", "cpu")
    assert engines_from_args(args, tmp_path, "serve") is None
    err = capsys.readouterr().err.strip()
    assert err == ("chatterbox-serverless serve: --model 'tiny-random-turbo' and --model "
                   "'ResembleAI/chatterbox-turbo' both serve chatterbox-turbo; give one checkpoint per model")
    assert not any(tmp_path.iterdir())                       # nothing was made or downloaded
