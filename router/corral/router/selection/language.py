"""A small language detector for the ``language`` signal: script first, then stop words.

Non-Latin scripts decide alone (Han -> zh unless kana appear -> ja, Hangul -> ko, Cyrillic -> ru, Arabic ->
ar, Devanagari -> hi, Greek -> el, Hebrew -> he); Latin-script text is scored by the share of its words
that are common stop words of en, de, fr, es, it, pt or nl. Unknown (``""``) when nothing scores.
"""

from __future__ import annotations

import re
from collections import Counter

_STOP: dict[str, frozenset[str]] = {
    "en": frozenset(
        [
            "the",
            "and",
            "is",
            "are",
            "was",
            "of",
            "to",
            "in",
            "that",
            "it",
            "for",
            "on",
            "with",
            "as",
            "this",
            "be",
            "at",
            "by",
            "not",
            "you",
            "what",
            "how",
        ]
    ),
    "de": frozenset(
        [
            "der",
            "die",
            "das",
            "und",
            "ist",
            "nicht",
            "ein",
            "eine",
            "zu",
            "den",
            "mit",
            "von",
            "ich",
            "sie",
            "es",
            "auf",
            "für",
            "wie",
            "was",
            "auch",
        ]
    ),
    "fr": frozenset(
        [
            "le",
            "la",
            "les",
            "et",
            "est",
            "un",
            "une",
            "des",
            "du",
            "pas",
            "que",
            "qui",
            "dans",
            "pour",
            "sur",
            "avec",
            "ce",
            "il",
            "je",
            "vous",
        ]
    ),
    "es": frozenset(
        [
            "el",
            "la",
            "los",
            "las",
            "y",
            "es",
            "un",
            "una",
            "que",
            "de",
            "en",
            "por",
            "para",
            "con",
            "no",
            "se",
            "lo",
            "como",
            "del",
            "al",
        ]
    ),
    "it": frozenset(
        [
            "il",
            "lo",
            "la",
            "gli",
            "le",
            "e",
            "è",
            "un",
            "una",
            "che",
            "di",
            "non",
            "per",
            "con",
            "del",
            "della",
            "sono",
            "come",
            "ma",
        ]
    ),
    "pt": frozenset(
        [
            "o",
            "a",
            "os",
            "as",
            "e",
            "é",
            "um",
            "uma",
            "que",
            "de",
            "não",
            "em",
            "para",
            "com",
            "do",
            "da",
            "se",
            "como",
            "por",
            "mais",
        ]
    ),
    "nl": frozenset(
        [
            "de",
            "het",
            "een",
            "en",
            "is",
            "van",
            "ik",
            "te",
            "dat",
            "die",
            "in",
            "niet",
            "zijn",
            "op",
            "met",
            "voor",
            "wat",
            "hoe",
        ]
    ),
}
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SCRIPTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af]")),
    ("zh", re.compile(r"[\u4e00-\u9fff]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
)


def detect(text: str) -> str:
    """ISO 639-1 code of ``text``'s language, or ``""`` when unknown (reads at most 2,000 characters)."""
    sample = text[:2000]
    if not sample.isascii():
        other = "".join(_NON_ASCII.findall(sample))  # scripts are told apart on the non-ASCII part only
        if len(other) >= max(2, len(sample) // 20):
            for code, pattern in _SCRIPTS:
                if len(pattern.findall(other)) >= max(2, len(other) // 4):
                    return code
    words = Counter(w.lower() for w in _WORD.findall(sample))
    if not words:
        return ""
    best, score = "", 0
    for code, stop in _STOP.items():
        s = sum(words[w] for w in stop)
        if s > score:
            best, score = code, s
    return best
