"""The SDK and `say` with the family's models: each model's parameters checked before sending (Turbo's top_k,
Multilingual's language, voice conversion's source_audio), the model named by the slug or `model=` and posted to
/v1|v2/<model>, `convert_voice`, `say --model --language --top-k`; against the real server with one
FakeEngineForTests per model."""
from __future__ import annotations

import argparse
import asyncio
import io

import numpy as np
import pytest
import soundfile as sf

from chatterbox_serverless.client import AsyncClient, Client, ParameterError, validate_params
from chatterbox_serverless.client import params as client_params
from chatterbox_serverless.client.cli import add_arguments, say
from chatterbox_serverless.testing import FakeEngineForTests, start_server

MODELS = ("chatterbox-tts", "chatterbox-turbo", "chatterbox-multilingual", "chatterbox-vc")


def wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_the_copied_tables_match_the_engines():
    from chatterbox_serverless.engine.catalog import API_MODELS
    from chatterbox_serverless.engine.languages import LANGUAGES
    assert client_params.MODELS == tuple(API_MODELS.values())
    assert client_params.LANGUAGES == tuple(LANGUAGES)


@pytest.mark.parametrize("model, params, message", [
    ("chatterbox-turbo", {"text": "a", "top_k": 0}, "top_k must be between 1 and 6563"),
    ("chatterbox-turbo", {"text": "a", "top_k": 2.5}, "top_k must be an integer"),
    ("chatterbox-multilingual", {"text": "a", "language": "xx"}, "language must be one of ar, da"),
    ("chatterbox-vc", {}, "source_audio is required"),
    ("chatterbox-vc", {"source_audio": b""}, "source_audio: the audio is empty"),
    ("chatterbox-vc", {"source_audio": wav(), "stream": True}, "stream"),
    ("chatterbox-vc", {"source_audio": "  "}, "source_audio must not be empty"),
    ("chatterbox-tts", {"source_audio": "x"}, "text is required"),
])
def test_each_models_parameters_are_checked_before_sending(model, params, message):
    with pytest.raises(ParameterError, match=message):
        validate_params(params, model)


def test_vc_source_audio_from_a_file_becomes_a_data_uri(tmp_path):
    path = tmp_path / "speech.wav"
    path.write_bytes(wav())
    body = validate_params({"source_audio": path, "reference_audio": None}, "chatterbox-vc")
    assert body["source_audio"].startswith("data:audio/wav;base64,") and "reference_audio" not in body
    with pytest.raises(ParameterError, match="source_audio: cannot read"):
        validate_params({"source_audio": tmp_path / "missing.wav"}, "chatterbox-vc")
    # the hosted contract's own checks are unchanged for other models
    assert validate_params({"text": "a", "top_k": 0}) == {"text": "a", "top_k": 0}


def test_two_different_models_named_is_an_error():
    with Client(base_url="http://127.0.0.1:9") as c, pytest.raises(ParameterError, match="two models"):
        c.run_sync("chatterbox-tts", model="chatterbox-turbo", text="a")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engines = [FakeEngineForTests(model=m) for m in MODELS]
    with start_server(tmp_path_factory.mktemp("sdk-models"), engines=engines, batch_wait=0.0) as s:
        s.extra["engines"] = {e.model: e for e in engines}
        yield s


def ran_on(server, request_id: str) -> str:
    (model,) = [m for m, e in server.extra["engines"].items() if any(r.request_id == request_id
                                                                     for r in e.requests)]
    return model


def test_the_model_picks_the_route(server):
    with Client(base_url=server.url) as c:
        r = c.run_sync(model="chatterbox-turbo", text="Fast [laugh].", top_k=7, output_format="wav")
        assert ran_on(server, r.headers["x-request-id"]) == "chatterbox-turbo"
        assert server.extra["engines"]["chatterbox-turbo"].requests[-1].params.top_k == 7
        job = c.submit_async("chatterbox-multilingual", text="Bonjour.", language="fr")
        assert job.wait(timeout=20)["status"] == "COMPLETED"
        assert server.store.get(job.request_id).model == "chatterbox-multilingual"
        assert server.extra["engines"]["chatterbox-multilingual"].requests[-1].language == "fr"
        result = c.run(text="Default.")                      # no model: chatterbox-tts
        assert ran_on(server, result["request_id"]) == "chatterbox-tts"


def test_convert_voice(server, tmp_path):
    source = tmp_path / "speech.wav"
    source.write_bytes(wav(1.5))
    vc = server.extra["engines"]["chatterbox-vc"]
    with Client(base_url=server.url) as c:
        audio = c.convert_voice(source, reference_audio=wav(1.0), output_format="wav", seed=5)
    samples, rate = sf.read(io.BytesIO(audio))
    assert rate == 24000 and len(samples) > 0
    request = vc.requests[-1]
    assert abs(len(request.source.samples) / request.source.sample_rate - 1.5) < 0.01
    assert request.voice is not None and request.params.seed == 5

    async def go() -> bytes:
        async with AsyncClient(base_url=server.url) as ac:
            return await ac.convert_voice(wav(0.8), output_format="wav")
    assert sf.read(io.BytesIO(asyncio.run(go())))[1] == 24000
    assert vc.requests[-1].voice is None                     # no target: the built-in voice


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_say_with_a_model_and_its_parameters(server, tmp_path):
    out = tmp_path / "de.wav"
    with Client(base_url=server.url) as c:
        args = parse("Guten Tag.", "--model", "chatterbox-multilingual", "--language", "de", "-o", str(out), "-q")
        assert say(args, c, io.StringIO()) == 0
        assert sf.info(str(out)).samplerate == 24000
        assert server.extra["engines"]["chatterbox-multilingual"].requests[-1].language == "de"
        args = parse("Ha [laugh].", "--model", "chatterbox-turbo", "--top-k", "9", "-o", str(out), "-q")
        assert say(args, c, io.StringIO()) == 0
        assert server.extra["engines"]["chatterbox-turbo"].requests[-1].params.top_k == 9


@pytest.mark.parametrize("argv, message", [
    (["Hi.", "--language", "de"], "--language is a parameter of chatterbox-multilingual"),
    (["Hi.", "--top-k", "5", "--model", "chatterbox-multilingual"], "--top-k is a parameter of chatterbox-turbo"),
    (["Hi.", "--model", "chatterbox-vc"], "convert_voice"),
])
def test_say_refuses_parameters_of_another_model(tmp_path, capsys, argv, message):
    from chatterbox_serverless.cli import main
    assert main(["say", *argv, "-o", str(tmp_path / "x.wav"), "--server", "http://127.0.0.1:9"]) == 2
    assert message in capsys.readouterr().err
