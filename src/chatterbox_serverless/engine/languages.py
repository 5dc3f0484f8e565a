"""The languages Chatterbox Multilingual speaks (ISO 639-1 codes, as the official `SUPPORTED_LANGUAGES`).

A plain table with no heavy imports, so the API validates a request's `language` without loading the engine."""
from __future__ import annotations

LANGUAGES: dict[str, str] = {
    "ar": "Arabic", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese",
    "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "tr": "Turkish", "zh": "Chinese",
}
