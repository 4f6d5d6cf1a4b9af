"""Document-level cleaning: decode, normalise, and drop low-quality documents with a reason.

:func:`clean_document` is the one call the extract+clean stage makes per raw document::

    bytes/str --decode--> str --normalize--> str --quality_reason--> kept | dropped.<reason>

Every outcome is counted (``kept``, ``dropped.<reason>``, ``decode.replaced_docs``), so a run
reports exactly what it set aside and why. The filters are the document-level heuristics of
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
from typing import Literal

from pydantic import BaseModel, Field

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


class CleanConfig(BaseModel, extra="forbid"):
    """How documents are decoded and which ones are kept. ``None`` disables a rule.

    Length limits apply always; the Gopher rules (words ... dup_line_chars) only while
    ``quality`` is on. Defaults are Gopher's published thresholds.
    """

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


def clean_document(data: bytes | str, cfg: CleanConfig, counts: Counter) -> str | None:
    """Decode ``data`` (UTF-8, per ``cfg.decode_errors``), normalise and filter it.

    Returns the cleaned text, or None after counting ``dropped.<reason>``. Strings with lone
    surrogates (JSON can encode them; UTF-8 cannot) follow the same decode policy as invalid
    bytes, so every kept text can be written as UTF-8.
    """
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
        return None
    text = normalize(text)
    reason = quality_reason(text, cfg)
    if reason is not None:
        counts[f"dropped.{reason}"] += 1
        return None
    counts["kept"] += 1
    return text
