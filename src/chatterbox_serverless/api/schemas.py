"""The request parameters of the contract (types, ranges, defaults) and the response bodies.

Types are strict: a number given as a string, or a float seed, is a 400 naming the parameter (JSON integers are
accepted where a number is expected). Parameters this API does not know are ignored, as the hosted API does.
`text` must hold something to speak: control characters other than tab, line feed and carriage return (NUL
included) are refused, and so is text made only of whitespace and invisible format characters (zero-width
spaces and joiners, bidi marks: Unicode category Cf).
"""
from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..engine.contract import SynthesisParams
from ..media.formats import DEFAULT_FORMAT, MEDIA_TYPES, OutputFormatName, describe_formats

DEFAULT_TEXT = "Welcome to Chatterbox TTS, where your text turns into captivating audio effortlessly."
OUTPUT_FORMATS = MEDIA_TYPES        # output_format -> media type (listed once, in media/formats.py)
MAX_SEED = 2**63 - 1


class TTSRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    text: str = Field(description="The text to speak (required, non-empty; at most the server's text limit, "
                                  "5000 characters by default).", examples=[DEFAULT_TEXT])
    reference_audio: str | None = Field(
        None, description="Voice to clone: an http(s) URL, a data: URI or bare base64 of a wav/mp3/flac/ogg clip. "
                          "Omitted: the model's built-in voice.")
    exaggeration: float = Field(0.5, ge=0, le=2, description="Emotion exaggeration.")
    cfg_weight: float = Field(0.5, ge=0, le=2, description="Classifier-free guidance weight (pacing).")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature.")
    min_p: float = Field(0.05, ge=0, le=1, description="Min-p sampling threshold.")
    top_p: float = Field(1.0, ge=0, le=1, description="Top-p (nucleus) sampling threshold.")
    repetition_penalty: float = Field(1.2, ge=1, le=2, description="Penalty on repeated speech tokens.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Same input and seed give the same audio.")
    output_format: OutputFormatName = Field(DEFAULT_FORMAT, description=f"Audio container: {describe_formats()}.")
    voice: str | None = Field(
        None, description="A library voice (POST /v1/audio/voices): its id or name; 'default' (or omitted): the "
                          "model's built-in voice. Not together with reference_audio.")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="Playback speed of the result, 0.25-4: a time-stretch "
                                                           "that keeps the pitch (billed on the unstretched audio).")
    stream: bool = Field(False, description="Send the audio while it is generated, sentence chunk by sentence chunk "
                                            "(v1: a chunked response; v2: GET /v2/requests/{id}/audio follows it). "
                                            "wav then has a streaming header (sizes 0xFFFFFFFF), mp3/ogg/opus/aac "
                                            "come as frames, pcm raw; flac cannot be streamed.")

    @field_validator("stream")
    @classmethod
    def _streamable(cls, stream: bool, info: ValidationInfo) -> bool:
        from ..media.stream import STREAM_FORMATS
        fmt = info.data.get("output_format")
        if stream and fmt is not None and fmt not in STREAM_FORMATS:
            raise PydanticCustomError("stream_format", "output_format '{fmt}' cannot be streamed (use one of {ok}, or "
                                      "stream: false)", {"fmt": fmt, "ok": ", ".join(STREAM_FORMATS)})
        return stream

    @field_validator("voice")
    @classmethod
    def _one_voice(cls, voice: str | None, info: ValidationInfo) -> str | None:
        if voice is not None and info.data.get("reference_audio") is not None:
            raise PydanticCustomError("voice_and_reference", "give either 'voice' or 'reference_audio', not both")
        return voice

    @field_validator("text")
    @classmethod
    def _speakable_text(cls, text: str) -> str:
        for i, ch in enumerate(text):
            if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r":
                raise PydanticCustomError("text_control_character",
                                          "must not contain control characters other than tab and line breaks "
                                          f"(U+{ord(ch):04X} at position {i})")
        if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text):
            raise PydanticCustomError("text_empty", "must not be empty")
        return text

    def synthesis_params(self) -> SynthesisParams:
        return SynthesisParams(exaggeration=self.exaggeration, cfg_weight=self.cfg_weight,
                               temperature=self.temperature, min_p=self.min_p, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, seed=self.seed)


class V2Request(TTSRequest):
    """The v2 submission: the hosted parameters, and where to POST the result (additive; v1 ignores it)."""
    webhook_url: str | None = Field(
        None, description="v2 only: an http(s) URL the result body (as GET /v2/requests/{id} answers it) is POSTed "
                          "to once the job is COMPLETED or FAILED, signed Standard Webhooks style (webhook-id, "
                          "webhook-timestamp, webhook-signature; secret: GET /v1/account/webhook-secret), retried "
                          "with backoff. Same address rules as reference_audio URLs.")


class ParameterError(ValueError):
    """A 400 whose message names the parameter."""


def describe_validation_error(e: ValidationError) -> str:
    """One sentence naming the first offending parameter, e.g. "parameter 'seed': Input should be ... (got 1.5)"."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    if err.get("type") == "missing":
        return f"missing required parameter '{loc}'"
    if not loc:
        return f"invalid request body: {err.get('msg')}"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, str) or len(got) <= 40 else repr(got[:40] + "...")
    return f"parameter '{loc}': {err.get('msg')} (got {shown})"


class SubmitResponse(BaseModel):
    request_id: str
    status: Literal["QUEUED"] = "QUEUED"
    status_url: str
    response_url: str


class WebhookState(BaseModel):
    state: Literal["pending", "delivered", "failed"]
    attempts: int = Field(description="Attempts made so far.")
    last_status: int | None = Field(None, description="The receiver's HTTP status at the last attempt.")
    last_error: str | None = Field(None, description="Why the last attempt got no answer (refused, timed out).")


class _QueueFields(BaseModel):
    """This server's additive fields (present only where they apply)."""
    cancelled: bool | None = Field(None, description="true when the client cancelled the job (status FAILED).")
    queue_position: int | None = Field(None, description="QUEUED jobs: how many jobs will be claimed before this "
                                                         "one (0: next), in the fair order across API keys.")
    webhook: WebhookState | None = Field(None, description="Jobs submitted with webhook_url: the delivery.")


class StatusResponse(_QueueFields):
    request_id: str
    status: Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
    metrics: dict = Field(default_factory=dict)
    error: str | None = Field(None, description="Present when FAILED (served with HTTP 422).")


class ResultResponse(_QueueFields):
    request_id: str
    status: Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
    output: str | None = Field(None, description="Absolute, signed URL of the audio; expires with the result.")
    metrics: dict = Field(default_factory=dict, description="inference_time, queue_time, total_time (seconds), "
                                                             "audio_seconds, ...")
    error: str | None = None


class ErrorResponse(BaseModel):
    error: str
