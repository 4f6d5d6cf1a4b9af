"""train_tokenizer stage and the :class:`Tokenizer` every later stage encodes with.

SentencePiece BPE with byte fallback, set up to be *lossless* on any cleaned text:
identity normalisation (the cleaner already did NFC), no dummy prefix, no whitespace
collapsing, whitespace-only pieces allowed, and ``\\n`` / ``\\t`` as user-defined symbols so
line structure costs one token. The single character SentencePiece cannot represent literally
is its own meta symbol U+2581 ("▁", decoded as a space); :meth:`Tokenizer.encode` emits it as
its three UTF-8 byte-fallback tokens, which decode back to "▁". So
``decode(encode(text)) == text`` for every string.

The training sample is bounded and deterministic: documents of the train split are taken in
their stored order, keeping a hash-selected fraction so that the sample spreads over the whole
corpus, up to ``sample_bytes``; documents are cut into pieces of at most
``max_sentence_bytes`` at line boundaries (SentencePiece's unit of training is a "sentence").
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from pydantic import Field

from llmforge.config import Config, control
from llmforge.errors import DataError, NotFound, one_line
from llmforge.pipeline.fsutil import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from llmforge.stage import Stage

log = logging.getLogger(__name__)

META_SPACE = "\u2581"
TOKENIZER_FILE = "tokenizer.model"


class TokenizerConfig(Config):

    vocab_size: int = Field(32000, ge=300, le=1 << 20, description="vocabulary size incl. 256 byte pieces")
    sample_bytes: int = Field(100_000_000, gt=0, description="max UTF-8 bytes of training text sampled")
    max_sentence_bytes: int = Field(8192, ge=256, description="training text is cut into pieces this long")
    character_coverage: float = Field(0.9995, gt=0, le=1)
    split_digits: bool = True
    threads: int | None = control(None, "threads for training (default: all cores)")


def _chunks(text: str, max_bytes: int) -> Iterator[str]:
    """Cut text at line ends into pieces of at most ~max_bytes (a longer single line is cut hard)."""
    if len(text) * 4 <= max_bytes:  # fast path: certainly short enough
        yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8", "surrogatepass"))
        if buf and size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:
            for i in range(0, len(line), max_bytes // 4):
                yield line[i : i + max_bytes // 4]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def sample_texts(texts: Iterable[str], total_bytes: int, cfg: TokenizerConfig) -> Iterator[str]:
    """Deterministic, bounded training sample: take a hash-chosen ``fraction`` of the documents
    (all of them if the corpus is smaller than ``sample_bytes``), in order, until the budget is
    used; yield pieces of at most ``max_sentence_bytes``."""
    fraction = min(1.0, cfg.sample_bytes / max(total_bytes, 1))
    threshold = int(fraction * (1 << 32))
    used = 0
    for text in texts:
        if fraction < 1.0:
            h = int.from_bytes(hashlib.blake2b(text[:4096].encode("utf-8", "replace"), digest_size=4).digest(), "big")
            if h >= threshold:
                continue
        for piece in _chunks(text, cfg.max_sentence_bytes):
            n = len(piece.encode("utf-8", "replace"))
            if used + n > cfg.sample_bytes:
                return
            used += n
            yield piece


def train_sentencepiece(sentences: Iterable[str], cfg: TokenizerConfig) -> bytes:
    """Train and return the serialized SentencePiece model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        byte_fallback=True,
        character_coverage=cfg.character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=cfg.split_digits,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=cfg.max_sentence_bytes * 2,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        num_threads=cfg.threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


class Tokenizer:
    """A lossless wrapper around a SentencePiece model (see module docstring)."""

    def __init__(self, model_proto: bytes, *, path: Path | None = None):
        import sentencepiece as spm

        self.path = path
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        self._meta_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode()]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            data = path.read_bytes()
            return cls(data, path=path)
        except FileNotFoundError:
            raise NotFound(f"{path}: tokenizer model not found") from None
        except RuntimeError as e:
            raise DataError(f"{path}: not a SentencePiece model ({one_line(str(e))})") from None

    def encode(self, text: str) -> list[int]:
        if META_SPACE not in text:
            return self.sp.encode(text)
        out: list[int] = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                out.extend(self._meta_bytes)
            if part:
                out.extend(self.sp.encode(part))
        return out

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts on ``num_threads`` native threads (default: all cores)."""
        threads = num_threads or os.cpu_count() or 1
        special = [i for i, t in enumerate(texts) if META_SPACE in t]
        ids = self.sp.encode(list(texts), num_threads=threads)
        for i in special:
            ids[i] = self.encode(texts[i])
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.sp.decode(list(ids))


def train_tokenizer(
    texts: Iterable[str], total_bytes: int, cfg: TokenizerConfig, out_dir: str | os.PathLike
) -> dict:
    """The stage: sample, train, write ``tokenizer.model`` + ``manifest.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    t0 = time.time()
    stats = {"sample_bytes": 0, "sample_pieces": 0}

    def counted() -> Iterator[str]:
        for s in sample_texts(texts, total_bytes, cfg):
            stats["sample_bytes"] += len(s.encode("utf-8", "replace"))
            stats["sample_pieces"] += 1
            yield s

    proto = train_sentencepiece(counted(), cfg)
    if stats["sample_pieces"] == 0:
        raise ValueError("train_tokenizer: the train split holds no text to learn a vocabulary from")
    atomic_write_bytes(out_dir / TOKENIZER_FILE, proto)
    tok = Tokenizer(proto, path=out_dir / TOKENIZER_FILE)
    manifest = {
        **_describe(tok),
        "config": cfg.model_dump(),
        "stats": {**stats, "seconds": round(time.time() - t0, 3)},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("tokenizer: %d pieces from %d sample bytes in %.1fs", tok.vocab_size, stats["sample_bytes"], time.time() - t0)
    return manifest


class TokenizerStage(Stage):
    """Train a SentencePiece tokenizer on the cleaned train split: ``tokenizer-<key>/``
    (``tokenizer.model`` + ``manifest.json``, written last)."""

    name = "tokenizer"

    def __init__(self, config: TokenizerConfig, clean_key: str, root: str | os.PathLike):
        self.config, self.clean_key, self.root = config, clean_key, Path(root)

    def inputs(self) -> list[str]:
        return [self.clean_key]

    @property
    def out_dir(self) -> Path:
        return self.root / f"tokenizer-{self.key}"

    def completed(self) -> dict | None:
        m = load_manifest(self.out_dir)
        return None if m is None else {**m, "path": str(self.out_dir / TOKENIZER_FILE)}

    def run(self, texts: Iterable[str], total_bytes: int) -> dict:
        from llmforge.pipeline.fsutil import DirLock

        with DirLock(self.out_dir):  # one writer per output directory
            m = train_tokenizer(texts, total_bytes, self.config, self.out_dir)
        return {**m, "path": str(self.out_dir / TOKENIZER_FILE)}


def tokenizer_manifest(model_path: str | os.PathLike) -> dict:
    """Manifest for an existing tokenizer (fine-tuning reuses the base model's)."""
    tok = Tokenizer.load(model_path)
    return {**_describe(tok), "source": str(tok.path), "path": str(Path(tok.path).resolve())}


def _describe(tok: Tokenizer) -> dict:
    """What every tokenizer manifest records about its model file."""
    return {
        "file": TOKENIZER_FILE,
        "sha256": sha256_file(tok.path),
        "fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
    }


def load_manifest(tok_dir: str | os.PathLike) -> dict | None:
    p = Path(tok_dir) / "manifest.json"
    if not p.is_file() or not (Path(tok_dir) / TOKENIZER_FILE).is_file():
        return None
    return read_json(p)
