"""api/schemas.py: `text` made only of invisible characters, or holding NUL/control characters, is a 400 at
validation (a field validator on TTSRequest, so every route using the model gets it), in the API's error shape."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from chatterbox_serverless.api.schemas import TTSRequest, describe_validation_error


def error_for(text: str) -> str:
    with pytest.raises(ValidationError) as err:
        TTSRequest.model_validate_json(json.dumps({"text": text}))
    return describe_validation_error(err.value)


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u200b \n\u00ad\t", "\u202e\u202c",
                                  "", "   ", "\n\r\t", "\u2028\u3000"])
def test_nothing_to_speak_is_empty(text):
    message = error_for(text)
    assert message.startswith("parameter 'text': must not be empty"), message


@pytest.mark.parametrize("text, code, position", [
    ("hello\x00world", "U+0000", 5), ("\x00", "U+0000", 0), ("bell\x07", "U+0007", 4), ("esc \x1b[31m", "U+001B", 4),
    ("form\x0cfeed", "U+000C", 4), ("vertical\x0btab", "U+000B", 8), ("del\x7f", "U+007F", 3),
    ("c1 \x85 next line", "U+0085", 3), ("c1 \x9b", "U+009B", 3),
])
def test_control_characters_are_refused_naming_the_parameter(text, code, position):
    message = error_for(text)
    assert message.startswith("parameter 'text': must not contain control characters other than tab and line "
                              f"breaks ({code} at position {position})"), message
    assert "\x00" not in message and "\x1b" not in message         # shown escaped (repr), never raw


@pytest.mark.parametrize("text", ["Hello there.", "line one\nline two\r\n\tindented", "\u200bhello",
                                  "caf\u00e9 \u2014 \u65e5\u672c\u8a9e", "emoji \U0001f600 with \u200d joiner",
                                  "\u05e9\u05dc\u05d5\u05dd \u200f"])
def test_ordinary_text_passes_unchanged(text):
    assert TTSRequest.model_validate_json(json.dumps({"text": text})).text == text


def test_the_validator_runs_for_every_way_of_building_the_model():
    with pytest.raises(ValidationError):
        TTSRequest(text="\u200b")
    with pytest.raises(ValidationError):
        TTSRequest.model_validate({"text": "a\x00"})


def test_other_errors_keep_their_shape():
    with pytest.raises(ValidationError) as err:
        TTSRequest.model_validate_json(json.dumps({"text": "hi", "seed": 1.5}))
    assert describe_validation_error(err.value).startswith("parameter 'seed': ")
    with pytest.raises(ValidationError) as err:
        TTSRequest.model_validate_json("{}")
    assert describe_validation_error(err.value) == "missing required parameter 'text'"
