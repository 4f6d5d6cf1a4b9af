"""Document-level cleaning: decode, normalise, and drop low-quality documents with a reason.

:func:`clean_document` is the one call the extract+clean stage makes per raw document::

    bytes/str --decode--> str --normalize--> str [--strip_gutenberg-->] str --quality_reason--> kept | dropped.<reason>

Every outcome is counted (``kept``, ``dropped.<reason>``, ``decode.replaced_docs``), and so are
bytes (``text_bytes_in``, ``dropped_bytes.<reason>``, ``gutenberg.stripped_bytes``), so a run
reports exactly what it set aside and why; :func:`byte_drop_warnings` turns the counts into a
warning for every rule that dropped more than a tenth of the input text.

Which rules apply depends on the kind of text: a *profile* (``web``, ``books``, ``code``,
``none``; see :data:`PROFILES`) sets the defaults, and explicit fields override it::

    CleanConfig.from_profile("books")                 # in YAML:  clean: {profile: books}
    CleanConfig(profile="books", min_chars=1000)      #           clean: {profile: books, min_chars: 1000}
 The filters are the document-level heuristics of
Gopher (Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
Gopher", appendix A.1.1 "MassiveWeb" quality filters and repetition removal); each can be
switched off (``None``) or all at once (``quality=False``). Everything here is linear-time and
avoids per-character Python loops: ``str.translate``/``str.count``/compiled regexes and C-level
``split``/``Counter`` do the work.
"""

from __future__ import annotations

import codecs
import itertools
import operator
import re
import unicodedata
from collections import Counter
from typing import Any, Literal, Mapping

from pydantic import BaseModel, Field, model_validator

#: Every reason :func:`quality_reason` can return, in the order the rules are checked
#: (``undecodable`` comes from :func:`clean_document`'s decode step).
REASONS = (
    "undecodable",
    "empty",
    "too_short",
    "too_long",
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_ratio",
    "alpha_words",
    "bullet_lines",
    "ellipsis_lines",
    "dup_lines",
    "dup_line_chars",
)


#: Named cleaning profiles: the field values each sets; a spec's own fields override them.
#: ``web`` is the plain defaults (Gopher's thresholds, made for web pages). ``books`` keeps long
#: documents (a novel has far more than Gopher's 100,000 words), keeps repeated lines (a play
#: repeats its speakers' names hundreds of times: Gopher's repetition rules dropped 6 of the
#: team's 824 Gutenberg books, 4 of them plays) and strips Project Gutenberg's licence header
#: and footer. ``code`` turns off the word-based prose rules (source code is not
#: prose) and keeps the length bounds. ``none`` only decodes and normalises (empty documents
#: are still dropped).
PROFILES: dict[str, dict[str, Any]] = {
    "web": {},
    "books": {"max_chars": None, "max_words": None, "max_dup_lines": None, "max_dup_line_chars": None,
              "strip_gutenberg": True},
    "code": {"quality": False},
    "none": {"min_chars": None, "max_chars": None, "quality": False},
}


class CleanConfig(BaseModel, extra="forbid"):
    """How documents are decoded and which ones are kept. ``None`` disables a rule.

    Length limits apply always; the Gopher rules (words ... dup_line_chars) only while
    ``quality`` is on. Field defaults are the ``web`` profile: Gopher's published thresholds.
    ``profile`` fills in every field not given explicitly from :data:`PROFILES`.
    """

    profile: str = Field(
        "web", description=f"named defaults for the kind of text: one of {', '.join(PROFILES)}; "
        "explicit fields override it"
    )
    strip_gutenberg: bool = Field(
        False, description="remove Project Gutenberg's licence header (through '*** START OF THE PROJECT "
        "GUTENBERG EBOOK ...' or the old 'SMALL PRINT' block) and footer ('*** END OF ...' and after)"
    )
    decode_errors: Literal["replace", "drop"] = Field(
        "replace",
        description="invalid UTF-8: 'replace' bad bytes with U+FFFD (counted in decode.replaced_docs) "
        "or 'drop' the document (reason 'undecodable')",
    )
    min_chars: int | None = Field(200, ge=0, description="drop documents shorter than this (after normalising)")
    max_chars: int | None = Field(
        1_000_000, ge=1, description="drop (never truncate: that loses meaning) documents longer than this"
    )
    quality: bool = Field(True, description="master switch for all the Gopher rules below")
    min_words: int | None = Field(50, ge=0, description="Gopher: at least 50 whitespace-separated words")
    max_words: int | None = Field(100_000, ge=1, description="Gopher: at most 100,000 words")
    min_mean_word_length: float | None = Field(3.0, description="Gopher: mean word length at least 3 characters")
    max_mean_word_length: float | None = Field(10.0, description="Gopher: mean word length at most 10 characters")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="Gopher: at most 0.1 '#' per word, and at most 0.1 ellipses ('...' or '…') per word"
    )
    min_alpha_words: float | None = Field(
        0.8, ge=0, le=1, description="Gopher: at least 80% of words contain an alphabetic character"
    )
    max_bullet_lines: float | None = Field(
        0.9, ge=0, le=1, description="Gopher: at most 90% of (non-empty) lines start with a bullet point"
    )
    max_ellipsis_lines: float | None = Field(
        0.3, ge=0, le=1, description="Gopher: at most 30% of (non-empty) lines end with an ellipsis"
    )
    max_dup_lines: float | None = Field(
        0.3, ge=0, le=1, description="Gopher: at most 30% of non-empty lines repeat an earlier line"
    )
    max_dup_line_chars: float | None = Field(
        0.2, ge=0, le=1, description="Gopher: at most 20% of characters are in lines repeating an earlier line"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        name = data.get("profile", "web")
        if name not in PROFILES:
            raise ValueError(f"unknown clean profile {name!r}; known profiles: {', '.join(PROFILES)}")
        return {**PROFILES[name], **data}

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> "CleanConfig":
        """The config of profile ``name`` with ``overrides`` on top."""
        return cls(profile=name, **overrides)


#: The setting that controls each drop reason, for messages that tell the user what to change.
RULE_SETTINGS = {
    "undecodable": "decode_errors", "too_short": "min_chars", "too_long": "max_chars",
    "too_few_words": "min_words", "too_many_words": "max_words",
    "mean_word_length": "min_mean_word_length / max_mean_word_length", "symbol_ratio": "max_symbol_word_ratio",
    "alpha_words": "min_alpha_words", "bullet_lines": "max_bullet_lines", "ellipsis_lines": "max_ellipsis_lines",
    "dup_lines": "max_dup_lines", "dup_line_chars": "max_dup_line_chars",
}


# C0 controls except \t and \n (\r is turned into \n before this runs), DEL, and C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ASCII_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])
_SURROGATE = re.compile("[\ud800-\udfff]")
_BULLETS = ("•", "‣", "◦", "▪", "▫", "●", "○", "■", "□", "∙", "·", "*", "-", "–")
_starts_with_bullet = operator.methodcaller("startswith", _BULLETS)
_ends_with_ellipsis = operator.methodcaller("endswith", ("...", "…"))
# A word (whitespace-delimited) with no letter: only punctuation/symbols, digits and '_'.
_NO_ALPHA = re.compile(r"(?:[^\w\s]|[\d_])+")


def normalize(text: str) -> str:
    """The only changes cleaning makes to a kept document's text, in this order:

    1. line endings ``\\r\\n`` and lone ``\\r`` become ``\\n``;
    2. control characters are removed: C0 except ``\\t`` and ``\\n``, DEL, and C1 (U+0080-U+009F);
    3. a leading byte-order mark (U+FEFF) is removed;
    4. Unicode NFC (skipped when the text is ASCII, which NFC never changes).

    Everything else is kept exactly, whitespace included (leading/trailing blank lines,
    indentation, tabs, any script): the tokenizer is lossless, so the model sees what the
    author wrote. The function is idempotent.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # O(1) flag check; bytes.translate is ~10x faster than the regex
        raw = text.encode("ascii")
        kept = raw.translate(None, _ASCII_CONTROL_BYTES)
        return kept.decode("ascii") if len(kept) != len(raw) else text
    text = _CONTROL.sub("", text)  # returns ``text`` itself when there is nothing to remove
    if text.startswith("\ufeff"):
        text = text[1:]
    return unicodedata.normalize("NFC", text)  # quick-checks first: no copy when already NFC


def _count_no_alpha_words(words: list[str]) -> int:
    """How many words contain no alphabetic character.

    Most words are purely alphabetic (``str.isalpha`` in C); only the rest (punctuation
    attached, numbers, symbols) are examined with a regex.
    """
    candidates = itertools.filterfalse(str.isalpha, words)
    return len(list(filter(None, map(_NO_ALPHA.fullmatch, candidates))))  # C-level loop, no genexpr


def quality_reason(text: str, cfg: CleanConfig) -> str | None:
    """The name of the first rule ``text`` fails (see :data:`REASONS`), or None to keep it.

    Expects normalised text. Words are whitespace-separated tokens; lines are the non-empty
    ``\\n``-separated lines. The Gopher rules (Rae et al. 2021, A.1.1) are:
    word count in [50, 100000]; mean word length in [3, 10]; '#' and ellipsis each at most 0.1
    per word; at least 80% of words with an alphabetic character; at most 90% of lines starting
    with a bullet and at most 30% ending with an ellipsis; and from the repetition removal, at
    most 30% duplicate lines and at most 20% of characters in duplicate lines.
    """
    n_chars = len(text)
    if not text or text.isspace():
        return "empty"
    if cfg.min_chars is not None and n_chars < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and n_chars > cfg.max_chars:
        return "too_long"
    if not cfg.quality:
        return None

    words = text.split()
    n_words = len(words)
    if cfg.min_words is not None and n_words < cfg.min_words:
        return "too_few_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        return "too_many_words"
    if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
        mean = len("".join(words)) / n_words  # one C-level join beats summing per-word lengths
        if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
            return "mean_word_length"
        if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
            return "mean_word_length"
    n_ellipses = text.count("...") + text.count("…")
    if cfg.max_symbol_word_ratio is not None:
        limit = cfg.max_symbol_word_ratio * n_words
        if text.count("#") > limit or n_ellipses > limit:
            return "symbol_ratio"
    if cfg.min_alpha_words is not None:
        if n_words - _count_no_alpha_words(words) < cfg.min_alpha_words * n_words:
            return "alpha_words"
    del words

    need_lines = any(
        v is not None for v in (cfg.max_bullet_lines, cfg.max_ellipsis_lines, cfg.max_dup_lines, cfg.max_dup_line_chars)
    )
    if not need_lines:
        return None
    line_counts = Counter(text.split("\n"))
    line_counts.pop("", None)
    n_lines = line_counts.total()
    if n_lines == 0:
        return None
    # Per-line tests run over the distinct lines only, weighted by their counts, with C-level
    # iterators (map/compress) instead of a Python loop.
    if cfg.max_bullet_lines is not None:
        starts = map(_starts_with_bullet, map(str.lstrip, line_counts))
        if sum(itertools.compress(line_counts.values(), starts)) > cfg.max_bullet_lines * n_lines:
            return "bullet_lines"
    if cfg.max_ellipsis_lines is not None and n_ellipses > cfg.max_ellipsis_lines * n_lines:
        # (a line can only end with an ellipsis if the text has that many ellipses at all)
        ends = map(_ends_with_ellipsis, map(str.rstrip, line_counts))
        if sum(itertools.compress(line_counts.values(), ends)) > cfg.max_ellipsis_lines * n_lines:
            return "ellipsis_lines"
    dup_lines = n_lines - len(line_counts)
    if cfg.max_dup_lines is not None and dup_lines > cfg.max_dup_lines * n_lines:
        return "dup_lines"
    if cfg.max_dup_line_chars is not None and dup_lines:
        # characters of all lines minus characters of each distinct line once
        dup_chars = (n_chars - text.count("\n")) - sum(map(len, line_counts))
        if dup_chars > cfg.max_dup_line_chars * n_chars:
            return "dup_line_chars"
    return None


def _decode(data: bytes, cfg: CleanConfig, counts: Counter) -> str | None:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if cfg.decode_errors == "drop":
            return None
        counts["decode.replaced_docs"] += 1
        return data.decode("utf-8", "replace")


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def clean_document(data: bytes | str, cfg: CleanConfig, counts: Counter) -> str | None:
    """Decode ``data`` (UTF-8, per ``cfg.decode_errors``), normalise and filter it.

    Returns the cleaned text, or None after counting ``dropped.<reason>``. Strings with lone
    surrogates (JSON can encode them; UTF-8 cannot) follow the same decode policy as invalid
    bytes, so every kept text can be written as UTF-8. Bytes are counted too: the input size
    under ``text_bytes_in`` and, for a dropped document, under ``dropped_bytes.<reason>``.
    """
    n_in = len(data) if isinstance(data, bytes) else _utf8_len(data)
    counts["text_bytes_in"] += n_in
    if isinstance(data, bytes):
        text = _decode(data, cfg, counts)
    else:
        text = data
        if not text.isascii() and _SURROGATE.search(text):
            if cfg.decode_errors == "drop":
                text = None
            else:
                counts["decode.replaced_docs"] += 1
                text = _SURROGATE.sub("\ufffd", text)
    if text is None:
        counts["dropped.undecodable"] += 1
        counts["dropped_bytes.undecodable"] += n_in
        return None
    text = normalize(text)
    if cfg.strip_gutenberg:
        text = strip_gutenberg(text, counts)
    reason = quality_reason(text, cfg)
    if reason is not None:
        counts[f"dropped.{reason}"] += 1
        counts[f"dropped_bytes.{reason}"] += n_in
        return None
    counts["kept"] += 1
    return text


def byte_drop_warnings(counts: Mapping[str, int], threshold: float = 0.10) -> list[str]:
    """One line for every rule that dropped more than ``threshold`` of the input text bytes.

    ``counts`` are :func:`clean_document`'s counters, summed over any number of documents
    (a unit's, or a whole stage's). A rule that eats a large share of a corpus usually means
    the profile does not fit the text (web-page filters on books or code), so each line names
    the setting to change.
    """
    total = counts.get("text_bytes_in", 0)
    if not total:
        return []
    lines = []
    drops = [(k.split(".", 1)[1], v) for k, v in counts.items() if k.startswith("dropped_bytes.")]
    for reason, n in sorted(drops, key=lambda kv: (-kv[1], kv[0])):
        if n > threshold * total:
            docs = counts.get(f"dropped.{reason}", 0)
            setting = RULE_SETTINGS.get(reason, reason)
            lines.append(
                f"clean: rule {reason!r} dropped {n / total:.1%} of the input text ({n / 1e6:.1f} of "
                f"{total / 1e6:.1f} MB, {docs} documents); if that is wrong for this corpus, choose a clean "
                f"profile that fits it ({', '.join(PROFILES)}) or set clean.{setting}"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate
#
# Seen in the team's Gutenberg sample (824 books): 90% carry the modern markers
# ("*** START OF THIS PROJECT GUTENBERG EBOOK <TITLE> ***", "***START OF THE ...", and the
# matching "*** END OF ..."), usually preceded by an "End of the Project Gutenberg EBook of ..."
# line; older files end their header with "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN
# ETEXTS*Ver.04.29.93*END*" and their text with "(The) End of (this) Project Gutenberg Etext of ...";
# the World Library Shakespeare files end theirs with a second "SMALL PRINT! FOR __ COMPLETE
# SHAKESPEARE" line and a '["Small Print" V.12.08.93]' line, and repeat a "<<THIS ELECTRONIC
# VERSION ... MEMBERSHIP.>>" notice between acts.

_PG_HEADER = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG.*$"
    r"|^.*\*[ \t]*END[ \t]*\*?[ \t]*THE SMALL PRINT!.*$"
    r"|^.*SMALL PRINT! FOR __ COMPLETE SHAKESPEARE.*$"
    r'|^[ \t]*\["Small Print" V\.[0-9.]+\][ \t]*$',
    re.IGNORECASE | re.MULTILINE,
)
_PG_END = re.compile(r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG", re.IGNORECASE | re.MULTILINE)
_PG_END_LINE = re.compile(
    r"^[ \t]*(?:THE )?END (?:OF )?(?:THE |THIS )?(?:PROJECT GUTENBERG|E-?TEXT)", re.IGNORECASE | re.MULTILINE
)
_PG_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\s+SHAKESPEARE IS COPYRIGHT[^>]{0,1000}>>\n*")
_PG_LOOKBACK = 2000  # the "End of the Project Gutenberg EBook of ..." line sits just above "*** END OF"
_PG_HEADER_SPAN = 64 * 1024  # headers end within 13 KB; a short poem's header can be most of it


def _gutenberg_bounds(text: str) -> tuple[int, int]:
    """(start, end) of the book inside Project Gutenberg's header and footer (0, len: none)."""
    start = 0
    # the last header marker in the first half (or the first 64 KB: short works, long headers)
    for m in _PG_HEADER.finditer(text, 0, max(len(text) // 2, _PG_HEADER_SPAN)):
        start = m.end()
    end = len(text)
    strong = _PG_END.search(text, start)
    if strong is not None:
        end = strong.start()
        weak = _PG_END_LINE.search(text, max(start, end - _PG_LOOKBACK), end)
        if weak is not None:
            end = weak.start()
    else:  # old files: only an "End of (this) Project Gutenberg Etext" line, near the end
        weak = _PG_END_LINE.search(text, max(start, len(text) // 2))
        if weak is not None:
            end = weak.start()
    return start, end


def strip_gutenberg(text: str, counts: Counter | None = None) -> str:
    """``text`` without Project Gutenberg's licence header and footer (and the text after the
    footer marker), or ``text`` itself when it has none. Counts ``gutenberg.header_docs``,
    ``gutenberg.footer_docs`` and ``gutenberg.stripped_bytes`` when ``counts`` is given."""
    if not ("utenberg" in text or "UTENBERG" in text or "SMALL PRINT" in text):  # cheap exit for other text
        return text
    start, end = _gutenberg_bounds(text)
    book = text[start:end]
    book = _PG_NOTICE.sub("", book) if "<<THIS ELECTRONIC VERSION" in book else book
    if start == 0 and end == len(text) and len(book) == len(text):
        return text
    book = book.lstrip("\n").rstrip()
    if counts is not None:
        counts["gutenberg.header_docs"] += start > 0
        counts["gutenberg.footer_docs"] += end < len(text)
        counts["gutenberg.stripped_bytes"] += _utf8_len(text) - _utf8_len(book)
    return book
