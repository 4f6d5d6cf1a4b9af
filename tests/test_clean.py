"""Document cleaning: normalisation, Gopher quality rules with reasons, decode policies,
profiles, byte accounting, Project Gutenberg boilerplate."""

from __future__ import annotations

import sysconfig
import unicodedata
from collections import Counter
from pathlib import Path

import pydantic
import pytest

from llmforge.pipeline.clean import (
    PROFILES, REASONS, CleanConfig, byte_drop_warnings, clean_document, normalize, quality_reason, strip_gutenberg,
)
from llmforge.pipeline.readers import ReadStats, iter_documents

try:
    from support.corpora import gutenberg_shards, sample_texts
except ImportError:  # tests/ imported as a package
    from tests.support.corpora import gutenberg_shards, sample_texts


@pytest.fixture(scope="module")
def good() -> list[str]:
    return sample_texts(20, seed=11)


def outcomes(counts: Counter) -> Counter:
    """The per-document outcome counters, without the byte counters."""
    return Counter({k: v for k, v in counts.items() if not k.startswith(("text_bytes", "dropped_bytes.", "gutenberg."))})


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
    assert outcomes(counts) == Counter({f"dropped.{reason}": 1})


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
    assert outcomes(counts) == Counter({"kept": 1})


def test_invalid_utf8_is_replaced_and_counted(good):
    counts = Counter()
    data = good[0].encode() + b"\n\xff\xfe caf\xe9"
    out = clean_document(data, CleanConfig(), counts)
    assert out == good[0] + "\n\ufffd\ufffd caf\ufffd"
    assert outcomes(counts) == Counter({"kept": 1, "decode.replaced_docs": 1})


def test_invalid_utf8_is_dropped_under_drop_policy(good):
    counts = Counter()
    assert clean_document(good[0].encode() + b"\xff", CleanConfig(decode_errors="drop"), counts) is None
    assert outcomes(counts) == Counter({"dropped.undecodable": 1})
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
    assert outcomes(counts) == Counter({"dropped.undecodable": 1})


def test_counts_every_outcome_over_a_mixed_batch(good):
    counts = Counter()
    batch = [*good[:5], "too short", b"\xff" * 300, " ".join(["a", "of", "to"] * 100)]
    kept = [t for d in batch if (t := clean_document(d, CleanConfig(), counts)) is not None]
    assert kept == good[:5]
    assert outcomes(counts) == Counter({"kept": 5, "dropped.too_short": 1, "decode.replaced_docs": 1,
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


# ---------------------------------------------------------------------------------------------
# Profiles


def test_profiles_set_defaults_and_explicit_fields_override_them():
    assert CleanConfig() == CleanConfig.from_profile("web") == CleanConfig(profile="web")
    books = CleanConfig.from_profile("books")
    assert (books.max_chars, books.max_words, books.max_dup_lines, books.strip_gutenberg) == (None, None, None, True)
    assert books.min_words == 50 and books.quality  # the prose rules stay on for books
    code = CleanConfig.from_profile("code")
    assert (code.quality, code.min_chars, code.max_chars) == (False, 200, 1_000_000)
    none = CleanConfig.from_profile("none")
    assert (none.quality, none.min_chars, none.max_chars, none.strip_gutenberg) == (False, None, None, False)
    mine = CleanConfig(profile="books", max_words=500_000, min_chars=1000)
    assert (mine.max_words, mine.min_chars, mine.max_chars) == (500_000, 1000, None)
    # the flows pass configs as dicts: a dump rebuilds the same config
    for cfg in (books, code, none, mine):
        assert CleanConfig(**cfg.model_dump()) == cfg
    assert set(PROFILES) == {"web", "books", "code", "none"}


def test_unknown_profile_is_a_clear_error_naming_the_known_ones(tmp_path):
    from llmforge.pipeline.config import load_corpus

    with pytest.raises(pydantic.ValidationError, match="unknown clean profile 'novels'; known profiles: web, books, code, none"):
        CleanConfig(profile="novels")
    with pytest.raises(ValueError, match="unknown clean profile 'novels'"):
        load_corpus(None, sources=[str(tmp_path)], overrides={"clean": {"profile": "novels"}})
    # a bare name is short for {profile: name}; fields can be added on top
    assert load_corpus(None, sources=[str(tmp_path)], overrides={"clean": "books"}).clean == CleanConfig.from_profile("books")
    spec = load_corpus(None, sources=[str(tmp_path)], overrides={"clean": {"profile": "books", "min_chars": 10}})
    assert spec.clean.min_chars == 10 and spec.clean.max_words is None


def test_corpus_presets_choose_the_profile_of_their_text():
    from llmforge.pipeline.config import load_corpus

    assert load_corpus("gutenberg").clean.profile == "books"
    assert load_corpus("openwebtext").clean == CleanConfig()
    assert load_corpus("tinystories").clean.profile == "web"
    quick = load_corpus("quickstart").clean
    assert quick.profile == "code"
    # the rules quickstart applied before profiles existed: same kind of result
    assert quick.model_dump(exclude={"profile"}) == CleanConfig(quality=False, min_chars=200).model_dump(exclude={"profile"})


def _long_book(good: list[str]) -> str:
    """A novel's length: more than Gopher's 100,000 words, fewer than 1M characters."""
    pars: list[str] = []
    while sum(len(p.split()) for p in pars) <= 100_000:
        pars.extend(good)
    book = "\n\n".join(pars)
    assert len(book) < 1_000_000
    return book


def test_books_profile_keeps_a_long_book_that_the_web_rules_drop(good):
    book = _long_book(good)
    counts = Counter()
    assert clean_document(book, CleanConfig(), counts) is None
    assert outcomes(counts) == Counter({"dropped.too_many_words": 1})
    assert clean_document(book, CleanConfig.from_profile("books"), Counter()) == book


def test_books_profile_keeps_a_play_whose_speaker_lines_repeat(good):
    speakers = ["HAMLET.", "HORATIO.", "OPHELIA."]
    lines = []
    for i, par in enumerate(good * 3):
        lines += [speakers[i % 3], par.split("\n")[0]]
    play = "\n".join(lines)
    assert quality_reason(normalize(play), CleanConfig()) == "dup_lines"
    assert quality_reason(normalize(play), CleanConfig.from_profile("books")) is None


@pytest.mark.parametrize("module", ["stat.py", "colorsys.py", "string.py"])
def test_code_profile_keeps_python_source_that_the_web_rules_drop(module):
    source = (Path(sysconfig.get_paths()["stdlib"]) / module).read_text()
    assert quality_reason(normalize(source), CleanConfig()) is not None  # not prose
    assert quality_reason(normalize(source), CleanConfig.from_profile("code")) is None
    assert quality_reason("x = 1\n", CleanConfig.from_profile("code")) == "too_short"


def test_none_profile_only_decodes_and_normalises():
    cfg = CleanConfig.from_profile("none")
    assert clean_document(b"ok\r\n\x00", cfg, Counter()) == "ok\n"
    assert clean_document("#### ... ####", cfg, Counter()) == "#### ... ####"
    assert clean_document(" \n ", cfg, Counter()) is None  # nothing to keep


# ---------------------------------------------------------------------------------------------
# Bytes dropped per reason, and the warnings they raise


def test_counts_input_and_dropped_bytes_per_reason(good):
    counts = Counter()
    batch = [good[0], good[1].encode(), "too short é", b"\xff" * 300]
    for d in batch:
        clean_document(d, CleanConfig(decode_errors="drop"), counts)
    sizes = [len(good[0].encode()), len(good[1].encode()), len("too short é".encode()), 300]
    assert counts["text_bytes_in"] == sum(sizes)
    assert counts["dropped_bytes.too_short"] == sizes[2] and counts["dropped_bytes.undecodable"] == 300
    assert sum(v for k, v in counts.items() if k.startswith("dropped_bytes.")) == sizes[2] + 300


def test_byte_drop_warnings_name_each_rule_over_a_tenth_of_the_input(good):
    counts = Counter()
    for d in [*good, _long_book(good), "too short"]:
        clean_document(d, CleanConfig(), counts)
    warnings = byte_drop_warnings(counts)
    assert len(warnings) == 1, warnings  # too_short is far below 10% of the bytes
    share = counts["dropped_bytes.too_many_words"] / counts["text_bytes_in"]
    assert warnings[0].startswith(f"clean: rule 'too_many_words' dropped {share:.1%} of the input text")
    assert "1 documents" in warnings[0] and "clean.max_words" in warnings[0] and "books" in warnings[0]
    assert byte_drop_warnings(counts, threshold=0.99) == []
    assert byte_drop_warnings(Counter()) == []


@pytest.mark.needs_shared
def test_web_rules_on_books_raise_a_byte_warning_and_the_books_profile_does_not(shared_corpus):
    web, books = Counter(), Counter()
    for i, doc in enumerate(iter_documents(sorted(shared_corpus.glob("*.jsonl.zst"))[0], stats=ReadStats())):
        if i == 40:
            break
        clean_document(doc.data, CleanConfig(), web)
        clean_document(doc.data, CleanConfig.from_profile("books"), books)
    print("web:", byte_drop_warnings(web))
    assert any("too_many_words" in w or "too_long" in w for w in byte_drop_warnings(web))
    assert byte_drop_warnings(books) == []
    assert books["kept"] >= 39


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate (snippets of the real files, shortened)

_PG_MODERN = (
    "\ufeffThe Project Gutenberg EBook of The Story of Miss Moppet, by Beatrix Potter\r\n\r\n"
    "This eBook is for the use of anyone anywhere at no cost and with\r\n"
    "almost no restrictions whatsoever.  You may copy it, give it away or\r\n"
    "re-use it under the terms of the Project Gutenberg License included\r\n"
    "with this eBook or online at www.gutenberg.org\r\n\r\n\r\n"
    "Title: The Story of Miss Moppet\r\n\r\nAuthor: Beatrix Potter\r\n\r\n"
    "Release Date: July 20, 2005 [EBook #16359]\r\n\r\nLanguage: English\r\n\r\n\r\n"
    "{start}\r\n\r\n\r\n\r\n\r\n"
    "{body}\r\n\r\n\r\n\r\n"
    "End of the Project Gutenberg EBook of The Story of Miss Moppet, by Beatrix Potter\r\n\r\n"
    "{end}\r\n\r\n***** This file should be named 16359-8.txt or 16359-8.zip *****\r\n"
    "This and all associated files of various formats will be found in:\r\n"
    "        http://www.gutenberg.org/1/6/3/5/16359/\r\n\r\n"
    "*** START: FULL LICENSE ***\r\n\r\nTHE FULL PROJECT GUTENBERG LICENSE\r\n"
    "PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\r\n"
)
_PG_OLD = (
    "Project Gutenberg Etext of King Henry VI, Part 2, by Shakespeare\n"
    "PG has multiple editions of William Shakespeare's Complete Works\n\n\n"
    "Copyright laws are changing all over the world, be sure to check\n"
    "the copyright laws for your country before posting these files!!\n\n"
    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\n"
    "Why is this \"Small Print!\" statement here?  You know: lawyers.\n"
    "They tell us you might sue us if there is something wrong with\n"
    "your copy of this etext, even if you got it for free from\n\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n\n\n"
    "{body}\n\n\n\n\n\n"
    "End of Project Gutenberg Etext of King Henry VI, Part 2 by Shakespeare\n"
    "PG has multiple editions of William Shakespeare's Complete Works\n\n"
)
_WORLD_LIBRARY_NOTICE = (
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\n"
    "PROVIDED BY PROJECT GUTENBERG ETEXT OF CARNEGIE MELLON UNIVERSITY\n"
    "WITH PERMISSION.  ELECTRONIC AND MACHINE READABLE COPIES MAY BE\n"
    "DISTRIBUTED SO LONG AS SUCH COPIES (1) ARE FOR YOUR OR OTHERS\n"
    "PERSONAL USE ONLY, AND (2) ARE NOT DISTRIBUTED OR USED\n"
    "COMMERCIALLY.  PROHIBITED COMMERCIAL DISTRIBUTION INCLUDES BY ANY\n"
    "SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>\n\n"
)
_PG_WORLD_LIBRARY = (
    "The Complete Works of William Shakespeare\n\n"
    "****** SMALL PRINT! for COMPLETE SHAKESPEARE *****\n"
    "THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE,\n"
    "INCLUDING ALL OF ITS HEADERS AND THIS SMALL PRINT, IS COPYRIGHT (C)\n"
    "1990-1993 BY WORLD LIBRARY, INC., AND IS PROVIDED BY PROJECT GUTENBERG\n\n"
    "****   SMALL PRINT! FOR __ COMPLETE SHAKESPEARE ****\n"
    '["Small Print" V.12.08.93]\n\n' + _WORLD_LIBRARY_NOTICE + "\n\n\n"
    "{act1}\n\n\n" + _WORLD_LIBRARY_NOTICE + "{act2}\n\n\nTHE END\n\n\n\n\n" + _WORLD_LIBRARY_NOTICE +
    "\n\n\n\nEnd of this Etext of The Complete Works of William Shakespeare\n"
    "The First Part of King Henry the Sixth\n\n"
)


@pytest.mark.parametrize("start, end", [
    ("*** START OF THIS PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET ***",
     "*** END OF THIS PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET ***"),
    ("***START OF THE PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET***",
     "***END OF THE PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET***"),
    ("*** START OF THE PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET ***",
     "*** END OF THE PROJECT GUTENBERG EBOOK THE STORY OF MISS MOPPET ***"),
])
def test_strips_modern_gutenberg_header_and_footer(good, start, end):
    body = good[0] + "\n\n" + good[1]
    raw = _PG_MODERN.format(start=start, body=body.replace("\n", "\r\n"), end=end)
    counts = Counter()
    out = clean_document(raw.encode(), CleanConfig.from_profile("books"), counts)
    assert out == body
    assert counts["gutenberg.header_docs"] == 1 and counts["gutenberg.footer_docs"] == 1
    assert counts["gutenberg.stripped_bytes"] == len(normalize(raw).encode()) - len(body.encode())


def test_strips_old_small_print_header_and_etext_footer(good):
    body = "\n\n".join(good[:3])
    counts = Counter()
    assert strip_gutenberg(normalize(_PG_OLD.format(body=body)), counts) == body
    assert (counts["gutenberg.header_docs"], counts["gutenberg.footer_docs"]) == (1, 1)
    the_end = _PG_OLD.replace("End of Project", "The end of Project").format(body=body)
    assert strip_gutenberg(the_end) == body


def test_strips_world_library_shakespeare_notices_between_acts(good):
    text = _PG_WORLD_LIBRARY.format(act1=good[0], act2=good[1])
    out = strip_gutenberg(text)
    assert out == f"{good[0]}\n\n\n{good[1]}\n\n\nTHE END"
    assert "WORLD LIBRARY" not in out and "Etext" not in out


def test_text_without_gutenberg_boilerplate_is_untouched(good):
    text = good[0] + "\n\nThe Project Gutenberg edition was the first we read.\n\n" + good[1]
    counts = Counter()
    assert strip_gutenberg(text, counts) is text and not counts
    pg = _PG_MODERN.format(start="*** START OF THIS PROJECT GUTENBERG EBOOK X ***", body="\n\n".join(good[:6]),
                           end="*** END OF THIS PROJECT GUTENBERG EBOOK X ***")
    assert "START OF THIS" in clean_document(pg, CleanConfig(), Counter())  # web: not stripped


@pytest.mark.needs_shared
def test_gutenberg_header_and_footer_are_found_in_the_shared_corpus(shared_corpus):
    counts = Counter()
    n = 0
    for doc in iter_documents(shared_corpus, include=["*.jsonl.zst"], stats=ReadStats()):
        strip_gutenberg(normalize(doc.data), counts)
        n += 1
    header, footer = counts["gutenberg.header_docs"] / n, counts["gutenberg.footer_docs"] / n
    print(f"{n} books: header found in {header:.1%}, footer in {footer:.1%}, "
          f"{counts['gutenberg.stripped_bytes'] / 1e6:.1f} MB of boilerplate removed")
    # measured: 824/824 headers; 810/824 footers (the 14 others, First Folio plays, have none)
    assert header >= 0.99 and footer >= 0.97
