"""Output formats are listed once (media/formats.py); the encoder, the API schema, the SDK and the `say` command
derive theirs from it, and the client still imports without the server's dependencies."""
from __future__ import annotations

import argparse
import subprocess
import sys
import typing

from chatterbox_serverless.media import formats


def test_every_list_is_the_table():
    from chatterbox_serverless import client, media
    from chatterbox_serverless.api.schemas import OUTPUT_FORMATS, TTSRequest
    from chatterbox_serverless.client import cli, params
    from chatterbox_serverless.media import encode

    names = tuple(formats.OUTPUT_FORMATS)
    assert names == formats.FORMAT_NAMES == ("mp3", "wav", "flac", "ogg", "opus", "aac", "pcm")
    assert typing.get_args(formats.OutputFormatName) == names
    # the encoder
    assert encode.FORMATS == media.FORMATS == formats.MEDIA_TYPES == {f.name: f.media_type for f in
                                                                       formats.OUTPUT_FORMATS.values()}
    assert set(encode._WRITE_ARGS) == set(names)
    # the API
    assert OUTPUT_FORMATS == formats.MEDIA_TYPES
    schema = TTSRequest.model_json_schema()["properties"]["output_format"]
    assert tuple(schema["enum"]) == names and schema["default"] == formats.DEFAULT_FORMAT
    # the SDK (public name kept) and the say command
    assert client.OUTPUT_FORMATS == params.OUTPUT_FORMATS == names
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    (fmt_action,) = [a for a in parser._actions if a.dest == "format"]
    assert tuple(fmt_action.choices) == names
    assert cli.SUFFIX_FORMATS == {".mp3": "mp3", ".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".opus": "opus",
                                  ".aac": "aac", ".pcm": "pcm"}


def test_every_format_encodes_to_its_media_type():
    import numpy as np

    from chatterbox_serverless.media import encode_audio
    for name, fmt in formats.OUTPUT_FORMATS.items():
        data, media_type = encode_audio(np.zeros(2400, dtype=np.float32), 24000, name)
        assert media_type == fmt.media_type and data


def test_the_client_imports_without_server_dependencies():
    code = (
        "import sys\n"
        "import chatterbox_serverless.client, chatterbox_serverless.client.cli\n"
        "from chatterbox_serverless.client import OUTPUT_FORMATS\n"
        "heavy = [m for m in ('torch', 'fastapi', 'starlette', 'pydantic', 'soundfile', 'numpy', 'soxr', 'uvicorn',\n"
        "                     'redis', 'chatterbox_serverless.engine', 'chatterbox_serverless.api',\n"
        "                     'chatterbox_serverless.media.decode', 'chatterbox_serverless.media.fetch')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy) or 'light', OUTPUT_FORMATS)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[0] == "light", out.stdout


def test_the_media_package_loads_its_modules_lazily():
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from chatterbox_serverless import media; "
                          "assert 'soundfile' not in sys.modules and 'httpx' not in sys.modules; "
                          "media.parse_reference; assert 'soundfile' in sys.modules; "
                          "from chatterbox_serverless.media import FetchError, encode_audio; "
                          "assert sorted(media.__all__) == sorted(set(media.__all__)); "
                          "[getattr(media, n) for n in media.__all__]; print('ok')"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
