"""Document cleaning: normalisation, Gopher quality rules with reasons, decode policies."""

from __future__ import annotations

import unicodedata
from collections import Counter

import pydantic
import pytest

from llmforge.pipeline.clean import REASONS, CleanConfig, clean_document, normalize, quality_reason
from llmforge.pipeline.readers import ReadStats, iter_documents

try:
    from support.corpora import gutenberg_shards, sample_texts
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import gutenberg_shards, sample_texts


@pytest.fixture(scope="module")
def good() -> list[str]:
    return sample_texts(20, seed=11)


# ---------------------------------------------------------------------------------------------
# normalize


def test_normalize_composes_to_nfc():
    decomposed = "Cafe\u0301 na\u0308ive \u1100\u1161"  # e + acute, a + diaeresis, Hangul jamo
    out = normalize(decomposed)
    assert out == "Caf\u00e9 n\u00e4ive \uac00"
    assert unicodedata.is_normalized("NFC", out)


def test_normalize_unifies_line_endings():
    assert normalize("one\r\ntwo\rthree\n\r\nfour\r") == "one\ntwo\nthree\n\nfour\n"


@pytest.mark.parametrize("ascii_only", [True, False])
def test_normalize_removes_control_characters_but_keeps_tabs_and_newlines(ascii_only):
    tail = "" if ascii_only else " \u00e9\u4e2d"
    text = "a\x00b\x01c\x07d\x08e\tf\x0bg\x0ch\x1bi\x1fj\x7fk\nl" + tail
    assert normalize(text) == "abcde\tfghij" + "k\nl" + tail
    if not ascii_only:
        assert normalize("x\x80y\x85z\x9f!\u00a0\u00ad") == "xyz!\u00a0\u00ad"  # C1 gone, NBSP/soft hyphen kept


def test_normalize_keeps_non_latin_scripts_and_whitespace_exactly():
    text = (
        "  Приве́т, мир!\n\tمرحبا بالعالم\n你好，世界。\nこんにちは 🌍👩‍💻\n"
        "Γειά σου Κόσμε — ‘quotes’ “and” …\u2028end  \n\n"
    )
    assert normalize(text) == unicodedata.normalize("NFC", text)
    assert normalize(text).endswith("end  \n\n") and normalize(text).startswith("  ")


def test_normalize_strips_leading_byte_order_mark_only():
    assert normalize("\ufeffhello \ufeff world") == "hello \ufeff world"


def test_normalize_is_idempotent(good):
    messy = "\ufeffCafe\u0301\r\n\x00" + good[0] + "\r\x85end"
    once = normalize(messy)
    assert normalize(once) == once
    assert normalize(good[1]) == good[1]


# ---------------------------------------------------------------------------------------------
# quality rules


def test_keeps_real_prose(good):
    cfg = CleanConfig()
    assert [quality_reason(normalize(t), cfg) for t in good] == [None] * len(good)


def _lines(n: int, make) -> str:
    return "\n".join(make(i) for i in range(n))


def _bad_docs(good: list[str]) -> dict[str, tuple[str, CleanConfig]]:
    base = good[0]
    n_words = len(base.split())
    filler = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return {
        "empty": (" \n\t \n", CleanConfig()),
        "too_short": ("A short note about nothing in particular.", CleanConfig()),
        "too_long": (base, CleanConfig(max_chars=len(base) - 1)),
        "too_few_words": (" ".join(["extraordinarily"] * 30), CleanConfig()),
        "too_many_words": (base, CleanConfig(max_words=n_words - 1)),
        "mean_word_length": (" ".join(["a", "of", "to", "is", "an", "it"] * 40), CleanConfig()),
        "symbol_ratio": (base + "\n" + " ".join(f"#tag{i}" for i in range(n_words // 5)), CleanConfig()),
        "alpha_words": (base + "\n" + " ".join(str(1000 + i) for i in range(n_words // 2)), CleanConfig()),
        "bullet_lines": (_lines(30, lambda i: f"- {filler[i % 10]} item number {i} on this list of things"),
                         CleanConfig()),
        "ellipsis_lines": (_lines(30, lambda i: f"and then the {filler[i % 10]} story went on and on for a while {i}..."
                                  if i % 2 else f"the {filler[i % 10]} line number {i} is a complete sentence."),
                           CleanConfig()),
        "dup_lines": (_lines(20, lambda i: f"Line {i}: the {filler[i % 10]} statement is here." if i < 12
                             else "Subscribe to our newsletter for more news."), CleanConfig()),
        "dup_line_chars": (base + "\n" + ("This very long boilerplate footer sentence is repeated verbatim. " * 6
                                          + "\n") * 2, CleanConfig()),
    }


@pytest.mark.parametrize("reason", [r for r in REASONS if r != "undecodable"])
def test_each_quality_rule_drops_its_crafted_bad_document(good, reason):
    text, cfg = _bad_docs(good)[reason]
    assert quality_reason(normalize(text), cfg) == reason
    counts = Counter()
    assert clean_document(text, cfg, counts) is None
    assert counts == Counter({f"dropped.{reason}": 1})


_RULE_SWITCH = {
    "too_short": "min_chars", "too_long": "max_chars", "too_few_words": "min_words",
    "too_many_words": "max_words", "symbol_ratio": "max_symbol_word_ratio", "alpha_words": "min_alpha_words",
    "bullet_lines": "max_bullet_lines", "ellipsis_lines": "max_ellipsis_lines", "dup_lines": "max_dup_lines",
    "dup_line_chars": "max_dup_line_chars",
}


@pytest.mark.parametrize("reason", sorted(_RULE_SWITCH))
def test_each_rule_can_be_switched_off(good, reason):
    text, cfg = _bad_docs(good)[reason]
    off = cfg.model_copy(update={_RULE_SWITCH[reason]: None})
    assert quality_reason(normalize(text), off) != reason


def test_mean_word_length_rule_checks_both_bounds(good):
    long_words = " ".join(["internationalisation", "counterrevolutionaries"] * 30)
    assert quality_reason(long_words, CleanConfig()) == "mean_word_length"
    off = CleanConfig(min_mean_word_length=None, max_mean_word_length=None)
    assert quality_reason(long_words, off) is None
    short_words = _bad_docs(good)["mean_word_length"][0]
    assert quality_reason(short_words, CleanConfig(min_mean_word_length=None)) is None


def test_quality_switch_disables_gopher_rules_but_not_length_limits(good):
    cfg = CleanConfig(quality=False)
    for reason, (text, base_cfg) in _bad_docs(good).items():
        cfg_r = base_cfg.model_copy(update={"quality": False})
        got = quality_reason(normalize(text), cfg_r)
        if reason in ("empty", "too_short", "too_long"):
            assert got == reason
        else:
            assert got is None, reason
    assert quality_reason("tiny", cfg) == "too_short"


def test_ellipsis_counts_unicode_ellipsis_character(good):
    text = _lines(20, lambda i: f"the story number {i} went on and on and on for quite a while\u2026")
    assert quality_reason(text, CleanConfig()) == "ellipsis_lines"
    assert quality_reason(text.replace("\u2026", "."), CleanConfig()) is None


def test_config_rejects_unknown_keys_and_documents_defaults():
    with pytest.raises(pydantic.ValidationError):
        CleanConfig(min_char=10)
    cfg = CleanConfig()
    assert (cfg.min_chars, cfg.max_chars, cfg.min_words, cfg.max_words) == (200, 1_000_000, 50, 100_000)
    assert all(f.description for f in CleanConfig.model_fields.values())


# ---------------------------------------------------------------------------------------------
# clean_document: decode policies and counting


def test_clean_document_decodes_utf8_bytes_and_counts_kept(good):
    counts = Counter()
    data = ("\ufeff" + good[0].replace("\n", "\r\n")).encode("utf-8")
    assert clean_document(data, CleanConfig(), counts) == good[0]
    assert counts == Counter({"kept": 1})


def test_invalid_utf8_is_replaced_and_counted(good):
    counts = Counter()
    data = good[0].encode() + b"\n\xff\xfe caf\xe9"
    out = clean_document(data, CleanConfig(), counts)
    assert out == good[0] + "\n\ufffd\ufffd caf\ufffd"
    assert counts == Counter({"kept": 1, "decode.replaced_docs": 1})


def test_invalid_utf8_is_dropped_under_drop_policy(good):
    counts = Counter()
    assert clean_document(good[0].encode() + b"\xff", CleanConfig(decode_errors="drop"), counts) is None
    assert counts == Counter({"dropped.undecodable": 1})
    assert clean_document(good[0].encode(), CleanConfig(decode_errors="drop"), counts) == good[0]
    assert counts["kept"] == 1


def test_lone_surrogates_from_json_follow_the_decode_policy(good):
    text = good[0] + " \ud83d broken emoji"
    counts = Counter()
    out = clean_document(text, CleanConfig(), counts)
    assert out == good[0] + " \ufffd broken emoji"
    out.encode("utf-8")  # writable
    assert counts["decode.replaced_docs"] == 1
    counts = Counter()
    assert clean_document(text, CleanConfig(decode_errors="drop"), counts) is None
    assert counts == Counter({"dropped.undecodable": 1})


def test_counts_every_outcome_over_a_mixed_batch(good):
    counts = Counter()
    batch = [*good[:5], "too short", b"\xff" * 300, " ".join(["a", "of", "to"] * 100)]
    kept = [t for d in batch if (t := clean_document(d, CleanConfig(), counts)) is not None]
    assert kept == good[:5]
    assert counts == Counter({"kept": 5, "dropped.too_short": 1, "decode.replaced_docs": 1,
                              "dropped.too_few_words": 1, "dropped.mean_word_length": 1})


@pytest.mark.needs_shared
def test_cleans_real_gutenberg_books():
    shards = gutenberg_shards()
    if not shards:
        pytest.skip("../shared/corpus/gutenberg not present")
    stats, counts = ReadStats(), Counter()
    kept = []
    for i, doc in enumerate(iter_documents(shards[0], stats=stats)):
        if i == 25:
            break
        if (t := clean_document(doc.data, CleanConfig(), counts)) is not None:
            kept.append(t)
    assert stats.n_errors == 0
    assert sum(counts[k] for k in counts if k.startswith(("kept", "dropped."))) == 25
    assert counts["kept"] >= 15  # books; the largest exceed Gopher's 100k-word limit
    assert all("\r" not in t and unicodedata.is_normalized("NFC", t) for t in kept)
