"""The request parameters of the contract (types, ranges, defaults) and the response bodies.

Types are strict: a number given as a string, or a float seed, is a 400 naming the parameter (JSON integers are
accepted where a number is expected). Parameters this API does not know are ignored, as the hosted API does.
`text` must hold something to speak: control characters other than tab, line feed and carriage return (NUL
included) are refused, and so is text made only of whitespace and invisible format characters (zero-width
spaces and joiners, bidi marks: Unicode category Cf).

One request schema per API model (engine/catalog.py names them), each the body of its `/v1/<model>` and
`/v2/<model>` routes (`REQUESTS`, `V2_REQUESTS`):

    chatterbox-tts           TTSRequest: the hosted contract (unchanged)
    chatterbox-turbo         TurboRequest: text (with Turbo's paralinguistic tags), temperature, top_k, top_p,
                             repetition_penalty; exaggeration, cfg_weight and min_p are ignored (not parameters
                             of Turbo's sampling; the official model ignores them too)
    chatterbox-multilingual  MultilingualRequest: the original's parameters + language (default "en"; one of
                             engine/languages.py's 23 codes), repetition_penalty 2.0 by default
    chatterbox-vc            VoiceConversionRequest: source_audio (the speech to convert) and the target voice
                             (reference_audio or voice); no text, no streaming
"""
from __future__ import annotations

import unicodedata
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

from ..engine.catalog import API_MODELS
from ..engine.contract import SynthesisParams
from ..engine.languages import LANGUAGES
from ..media.formats import DEFAULT_FORMAT, MEDIA_TYPES, OutputFormatName, describe_formats

DEFAULT_TEXT = "Welcome to Chatterbox TTS, where your text turns into captivating audio effortlessly."
TURBO_TEXT = "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store."
OUTPUT_FORMATS = MEDIA_TYPES        # output_format -> media type (listed once, in media/formats.py)
MAX_SEED = 2**63 - 1
TURBO_MAX_TOP_K = 6563              # Turbo's speech vocabulary: top_k at this keeps every token
DEFAULT_LANGUAGE = "en"
MODEL = API_MODELS["original"]      # the hosted contract's model (TTSRequest)
TURBO_MIN_REFERENCE_SECONDS = 5.0   # Turbo's conditioning needs a clip longer than this (engine/conditioning.py)


class _Checks(BaseModel):
    """The checks every model's request shares, for the fields it has (output_format before stream,
    reference_audio before voice)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    min_reference_seconds: ClassVar[float | None] = None    # reference_audio shorter than this: 400 (None: the
                                                            # media default)

    @field_validator("stream", check_fields=False)
    @classmethod
    def _streamable(cls, stream: bool, info: ValidationInfo) -> bool:
        from ..media.stream import STREAM_FORMATS
        fmt = info.data.get("output_format")
        if stream and fmt is not None and fmt not in STREAM_FORMATS:
            raise PydanticCustomError("stream_format", "output_format '{fmt}' cannot be streamed (use one of {ok}, or "
                                      "stream: false)", {"fmt": fmt, "ok": ", ".join(STREAM_FORMATS)})
        return stream

    @field_validator("voice", check_fields=False)
    @classmethod
    def _one_voice(cls, voice: str | None, info: ValidationInfo) -> str | None:
        if voice is not None and info.data.get("reference_audio") is not None:
            raise PydanticCustomError("voice_and_reference", "give either 'voice' or 'reference_audio', not both")
        return voice

    @field_validator("text", check_fields=False)
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


class TTSRequest(_Checks):
    # chatterbox-tts: the hosted contract's parameters (no docstring: its schema stays the hosted one)
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


def _reference_field(target: str = "Voice to clone") -> Any:
    return Field(None, description=f"{target}: an http(s) URL, a data: URI or bare base64 of a wav/mp3/flac/ogg "
                                   "clip. Omitted: the model's built-in voice.")


def _voice_field() -> Any:
    return Field(None, description="A library voice (POST /v1/audio/voices): its id or name; 'default' (or omitted): "
                                   "the model's built-in voice. Not together with reference_audio.")


def _seed_field() -> Any:
    return Field(42, ge=0, le=MAX_SEED, description="Same input and seed give the same audio.")


def _speed_field() -> Any:
    return Field(1.0, ge=0.25, le=4.0, description="Playback speed of the result, 0.25-4: a time-stretch that keeps "
                                                   "the pitch (billed on the unstretched audio).")


def _format_field() -> Any:
    return Field(DEFAULT_FORMAT, description=f"Audio container: {describe_formats()}.")


def _stream_field() -> Any:
    return Field(False, description="Send the audio while it is generated, sentence chunk by sentence chunk (v1: a "
                                    "chunked response; v2: GET /v2/requests/{id}/audio follows it). wav then has a "
                                    "streaming header (sizes 0xFFFFFFFF), mp3/ogg/opus/aac come as frames, pcm raw; "
                                    "flac cannot be streamed.")


class TurboRequest(_Checks):
    """chatterbox-turbo: faster speech with paralinguistic tags. Its sampling is temperature, top_k, top_p and
    repetition_penalty (no classifier-free guidance, no min-p, no emotion control): exaggeration, cfg_weight and
    min_p are not parameters of this model, and a body that sends them is served with them ignored (as the
    official Turbo ignores them, and as any parameter this API does not know), so a request written for
    chatterbox-tts runs unchanged."""
    min_reference_seconds: ClassVar[float] = TURBO_MIN_REFERENCE_SECONDS

    text: str = Field(description="The text to speak (required, non-empty; at most the server's text limit, 5000 "
                                  "characters by default). Turbo's tags in square brackets are performed, not read: "
                                  "sounds ([laugh] [chuckle] [gasp] [cough] [sigh] [groan] [sniff] [shush] [clear "
                                  "throat]) and delivery ([whispering] [happy] [sarcastic] ...).",
                      examples=[TURBO_TEXT])
    reference_audio: str | None = Field(
        None, description="Voice to clone: an http(s) URL, a data: URI or bare base64 of a wav/mp3/flac/ogg clip "
                          f"longer than {TURBO_MIN_REFERENCE_SECONDS:g} s (Turbo's minimum). Omitted: the model's "
                          "built-in voice.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature (0: greedy decoding).")
    top_k: int = Field(1000, ge=1, le=TURBO_MAX_TOP_K, description="Sample among the k most likely speech tokens "
                       f"({TURBO_MAX_TOP_K}: all of Turbo's speech vocabulary).")
    top_p: float = Field(0.95, ge=0, le=1, description="Top-p (nucleus) sampling threshold.")
    repetition_penalty: float = Field(1.2, ge=1, le=2, description="Penalty on repeated speech tokens.")
    seed: int = _seed_field()
    output_format: OutputFormatName = _format_field()
    voice: str | None = _voice_field()
    speed: float = _speed_field()
    stream: bool = _stream_field()


def _language(value: str) -> str:
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise PydanticCustomError("language", "not a language this model speaks; use one of {codes}",
                                  {"codes": ", ".join(f"{c} ({name})" for c, name in LANGUAGES.items())})
    return code


class MultilingualRequest(TTSRequest):
    """chatterbox-multilingual: the original's parameters in 23 languages (`language`), with the official
    multilingual default repetition_penalty (2.0)."""
    repetition_penalty: float = Field(2.0, ge=1, le=2, description="Penalty on repeated speech tokens (2.0: the "
                                                                   "official multilingual default).")
    language: str = Field(DEFAULT_LANGUAGE, description="The language of the text, an ISO 639-1 code: "
                          + ", ".join(f"{c} ({name})" for c, name in LANGUAGES.items())
                          + f". Omitted: {DEFAULT_LANGUAGE}.", json_schema_extra={"enum": list(LANGUAGES)})

    @field_validator("language")
    @classmethod
    def _known_language(cls, language: str) -> str:
        return _language(language)


class VoiceConversionRequest(_Checks):
    """chatterbox-vc: voice conversion. The speech of `source_audio` (what is said, how it is said) spoken again
    in the target voice (`reference_audio` or `voice`; omitted: the built-in voice). No text: the result lasts as
    long as the source, and is billed on its audio seconds like any other job."""
    source_audio: str = Field(description="The speech to convert (required): an http(s) URL, a data: URI or bare "
                                          "base64 of a wav/mp3/flac/ogg clip, with reference_audio's rules (at most "
                                          "10 MB and 30 s).")
    reference_audio: str | None = _reference_field("The target voice")
    voice: str | None = Field(None, description="The target voice from the library (POST /v1/audio/voices): its id "
                                                "or name; 'default' (or omitted): the model's built-in voice. Not "
                                                "together with reference_audio.")
    seed: int = _seed_field()
    output_format: OutputFormatName = _format_field()
    speed: float = _speed_field()
    stream: bool = Field(False, description="false only: voice conversion makes the audio in one piece (true is "
                                            "refused).")

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, stream: bool) -> bool:
        if stream:
            raise PydanticCustomError("stream_vc", "voice conversion cannot be streamed (the audio is made in one "
                                      "piece): send stream: false or leave it out")
        return stream


def _v2_of(request: type[BaseModel]) -> type[BaseModel]:
    """`request` plus V2Request's `webhook_url` (the v2 body of that model)."""
    return create_model(request.__name__.replace("Request", "V2Request"), __base__=request,
                        __doc__=request.__doc__,
                        webhook_url=(str | None, V2Request.model_fields["webhook_url"]))


# API model -> its request body on /v1/<model>, and on /v2/<model>
REQUESTS: dict[str, type[BaseModel]] = {
    API_MODELS["original"]: TTSRequest,
    API_MODELS["turbo"]: TurboRequest,
    API_MODELS["multilingual"]: MultilingualRequest,
    API_MODELS["vc"]: VoiceConversionRequest,
}
V2_REQUESTS: dict[str, type[BaseModel]] = {model: V2Request if request is TTSRequest else _v2_of(request)
                                           for model, request in REQUESTS.items()}
AnyRequest = TTSRequest | TurboRequest | VoiceConversionRequest


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
