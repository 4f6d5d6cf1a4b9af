"""A small but real token dataset for tests: Python standard-library source text, a
SentencePiece BPE tokenizer trained on it by ``pipeline.tokenizer``, and shards written through the real shard writer.

Deterministic for a given Python installation and cheap (a couple of seconds); :func:`tiny_dataset`
builds it once per process under a base directory and returns the cached path afterwards.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from llmforge.pipeline.fsutil import atomic_dir, atomic_write_bytes, fingerprint
from llmforge.pipeline.shards import split_summary, token_dtype, write_manifest, write_shard

# plain-text-heavy, stable stdlib modules; read in this order
MODULES = [
    "argparse", "textwrap", "difflib", "fractions", "statistics", "calendar", "string",
    "shlex", "heapq", "bisect", "functools", "dataclasses", "pprint", "gettext", "locale",
    "random", "glob", "fnmatch", "tempfile", "shutil", "contextlib", "abc", "queue",
    "sched", "colorsys", "imghdr", "netrc", "codecs", "copy", "csv", "decimal",
    "enum", "getopt", "graphlib", "hmac", "inspect", "ipaddress", "keyword", "linecache",
    "numbers", "operator", "optparse", "pathlib", "pickle", "platform", "quopri", "reprlib",
    "secrets", "selectors", "signal", "socket", "stat", "struct", "subprocess", "symtable",
    "tabnanny", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types",
    "typing", "uuid", "warnings", "wave", "weakref", "zipfile",
]  # fmt: skip

_CACHE: dict[tuple, Path] = {}


def corpus_documents(max_bytes: int = 1_500_000) -> list[tuple[str, str]]:
    """(id, text) documents: whole stdlib module sources, up to ``max_bytes`` in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for name in MODULES:
        path = stdlib / f"{name}.py"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        docs.append((name, text))
        total += len(text.encode())
        if total >= max_bytes:
            break
    if len(docs) < 10:
        raise RuntimeError(f"{stdlib}: too few standard-library sources found for the test corpus")
    return docs


def build_tiny_dataset(
    root: Path, *, vocab_size: int = 512, max_bytes: int = 1_500_000, train_shards: int = 2
) -> Path:
    """Write a complete token dataset directory at ``root`` (manifest last, atomically), with a
    tokenizer trained by the project's own trainer (``pipeline.tokenizer``)."""
    from llmforge.pipeline.tokenizer import TokenizerConfig, Tokenizer, sample_texts, train_sentencepiece

    docs = corpus_documents(max_bytes)
    tcfg = TokenizerConfig(vocab_size=vocab_size, threads=1)
    total = sum(len(t.encode()) for _, t in docs)
    proto = train_sentencepiece(sample_texts((t for _, t in docs), total, tcfg), tcfg)
    tok = Tokenizer(proto)
    eos = tok.eos_id
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for i, d in enumerate(docs):
        splits["val" if i % 8 == 3 else "train"].append(d)
    with atomic_dir(root) as tmp:
        atomic_write_bytes(tmp / "tokenizer.model", proto)
        summaries = {}
        for split, items in splits.items():
            n_shards = train_shards if split == "train" else 1
            entries = []
            for k in range(n_shards):
                part = items[k::n_shards]
                encoded = [tok.encode(t) + [eos] for _, t in part]
                tokens = np.concatenate([np.asarray(e, dtype=dtype) for e in encoded])
                (tmp / split).mkdir(exist_ok=True)
                entries.append(
                    write_shard(
                        tmp / split / f"{split}-{k:05d}.arrow",
                        [i for i, _ in part],
                        [len(t.encode()) for _, t in part],
                        tokens,
                        [len(e) for e in encoded],
                        eos_id=eos,
                    )
                )
            summaries[split] = split_summary(entries)
        write_manifest(
            tmp,
            {
                "fingerprint": fingerprint("tinydata", tok.fingerprint, summaries),
                "token_dtype": dtype.name,
                "tokenizer": {
                    "file": "tokenizer.model",
                    "vocab_size": tok.vocab_size,
                    "eos_id": eos,
                    "fingerprint": tok.fingerprint,
                },
                "splits": summaries,
            },
        )
    return root


def tiny_dataset(base: Path, **kwargs) -> Path:
    """The tiny dataset under ``base`` (built on first use in this process, then reused)."""
    key = (str(base), tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        root = Path(base) / ("tinydata-" + fingerprint(sorted(kwargs.items()), length=8))
        if not (root / "manifest.json").is_file():
            build_tiny_dataset(root, **kwargs)
        _CACHE[key] = root
    return _CACHE[key]
