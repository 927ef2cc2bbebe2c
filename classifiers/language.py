"""language: tags the language of the prompt, by script and by common words; no model,
no dependency. Tags look like ``lang:en``, ``lang:ja``.

    [classifiers.language]
    prefix = "lang:"
    scope = "last"       # the last user message
    max_chars = 100000   # the newest text looked at, at most
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import msgspec

from classifiers.scope import MAX_CHARS, Scope, max_chars_problem, scoped_text
from proxy import RequestContext, hookimpl
from proxy.dispatch import no_plugin_context
from proxy.memo import memo
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str = "lang:"
    scope: Scope = "last"
    max_chars: int = MAX_CHARS


# (first, last code point, language) for scripts that name their language well enough.
_SCRIPTS = [
    (0x3040, 0x30FF, "ja"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"),
    (0x4E00, 0x9FFF, "zh"), (0x0400, 0x04FF, "ru"), (0x0600, 0x06FF, "ar"),
    (0x0590, 0x05FF, "he"), (0x0370, 0x03FF, "el"), (0x0900, 0x097F, "hi"),
    (0x0E00, 0x0E7F, "th"),
]
_COMMON_WORDS = {
    "en": "the a an and is are you what how this that with for of to in it please can i my we us"
          " me be do not on at your let",
    "es": "el la los las que de y es por para con una como qué está hola gracias mi",
    "fr": "le la les et est que une des pour avec vous je pas ce dans bonjour merci",
    "de": "der die das und ist nicht ich sie mit für ein eine wie was bitte hallo",
    "it": "il lo la che di e è per con una non sono come cosa ciao grazie",
    "pt": "o a os que de e é não para com uma você como está olá obrigado",
    "nl": "de het een en is niet ik je met voor van wat hoe dat dank",
}
_WORDS = {lang: frozenset(words.split()) for lang, words in _COMMON_WORDS.items()}
_WORD = re.compile(r"[^\W\d_]+")


def detect_language(text: str) -> str | None:
    if text.isascii():  # most prompts: no script to count, straight to the words
        return _by_words(text)
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    scripts: Counter[str] = Counter()
    for char in letters:
        point = ord(char)
        for first, last, language in _SCRIPTS:
            if first <= point <= last:
                scripts[language] += 1
                break
    if scripts:
        language, count = scripts.most_common(1)[0]
        if scripts["ja"] and language == "zh":
            language = "ja"  # Japanese mixes kana with kanji
        if count >= len(letters) * 0.3:
            if language == "ru" and any(c in text for c in "іїєґ"):
                return "uk"
            return language
    return _by_words(text)


def _by_words(text: str) -> str | None:
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {lang: sum(1 for w in words if w in common) for lang, common in _WORDS.items()}
    best = max(scores, key=lambda lang: scores[lang])
    return best if scores[best] else None


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    return settings_error(settings, Settings) or max_chars_problem(settings.get("max_chars"))


@hookimpl(trylast=True)
@no_plugin_context
def classify(ctx: RequestContext, settings: dict[str, Any]) -> list[str]:
    config = settings_as(settings, Settings)
    text = scoped_text(ctx.request, config.scope, config.max_chars)
    language = memo.get_or_compute("language", text, detect_language)
    return [config.prefix + language] if language else []
