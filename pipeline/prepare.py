"""The data stages of one corpus, planned: download -> clean -> tokenizer -> tokenize.

:class:`Prepare` builds the stage objects for a corpus spec without doing any work, so a command
can ask "is this dataset already made?" (:meth:`Prepare.done`) in a fraction of a second, before
any server starts. ``flows/data.py`` runs the same stages as Prefect tasks; this module also
holds what both print: the summary table and the warnings, each kind once with its count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmforge.errors import ConfigError
from llmforge.pipeline.config import CorpusSpec, load_corpus
from llmforge.pipeline.download import DownloadStage
from llmforge.pipeline.extract import CleanStage
from llmforge.pipeline.fsutil import human_bytes
from llmforge.pipeline.tokenize import TokenizeStage
from llmforge.pipeline.tokenizer import TokenizerStage, tokenizer_manifest


def load_spec(corpus: str | None, sources: list[str] | None, vocab_size: int | None,
              overrides: dict[str, Any] | None) -> CorpusSpec:
    ov = dict(overrides or {})
    if vocab_size:
        ov = {**ov, "tokenizer": {**ov.get("tokenizer", {}), "vocab_size": vocab_size}}
    return load_corpus(corpus, sources=sources, overrides=ov)


class Prepare:
    """The stages that turn ``spec`` into a token dataset under ``<out>/<spec.name>/``."""

    def __init__(self, spec: CorpusSpec, out: str | os.PathLike = "shards", tokenizer_model: str | None = None):
        self.spec = spec
        self.root = Path(out).resolve() / spec.name
        self.downloads = [DownloadStage(s, self.root / "downloads") for s in spec.sources]
        names: dict[str, str] = {}
        for s in spec.sources:  # two downloads into one .part would corrupt each other
            if not s.is_local and names.setdefault(s.name, s.url) != s.url:
                raise ConfigError(f"{s.url} and {names[s.name]} would both be saved as {s.name!r}: remove the "
                                  f"duplicate or give one a different `name`")
        # a given tokenizer (fine-tuning keeps the base model's) replaces the tokenizer stage
        self.reused_tokenizer = tokenizer_manifest(tokenizer_model) if tokenizer_model else None

    def clean(self, downloads: list[dict]) -> CleanStage:
        return CleanStage(self.spec, downloads, self.root)

    def tokenizer(self, clean: CleanStage) -> TokenizerStage | None:
        return None if self.reused_tokenizer else TokenizerStage(self.spec.tokenizer, clean.key, self.root)

    def tokenize(self, clean: CleanStage, tokenizer: dict) -> TokenizeStage:
        return TokenizeStage(self.spec.tokenize, clean.key, tokenizer, self.root)

    def directories(self) -> list[Path]:
        """The stage directories this plan can name without doing any work (a download that is not
        there yet hides the ones after it)."""
        out = [d.dest_dir for d in self.downloads if not d.config.is_local]
        downloads = [d.completed() for d in self.downloads]
        if all(d is not None for d in downloads):
            clean = self.clean(downloads)  # type: ignore[arg-type]
            out.append(clean.out_dir)
            tok_stage = self.tokenizer(clean)
            if tok_stage is not None:
                out.append(tok_stage.out_dir)
        return out

    def done(self) -> Path | None:
        """The dataset directory when every stage is complete and verifies, else None (without
        touching the network or writing anything)."""
        downloads = [d.completed() for d in self.downloads]
        if any(d is None for d in downloads):
            return None
        clean = self.clean(downloads)  # type: ignore[arg-type]
        if clean.completed() is None:
            return None
        tok_stage = self.tokenizer(clean)
        tok = self.reused_tokenizer if tok_stage is None else tok_stage.completed()
        if tok is None:
            return None
        tokenize = self.tokenize(clean, tok)
        return tokenize.out_dir if tokenize.completed() is not None else None


def summary_markdown(spec_name: str, rows: list[tuple], dataset: Path) -> str:
    lines = [f"# prepare `{spec_name}`", "", f"dataset: `{dataset}`", "",
             "| stage | status | input | output | seconds | MB/s |", "|---|---|---|---|---:|---:|"]
    for name, status, inp, out, secs, mbps in rows:
        lines.append(f"| {name} | {status} | {inp} | {out} | {secs:.1f} | {mbps} |")
    return "\n".join(lines) + "\n"


def rate(nbytes: float, secs: float) -> str:
    return f"{nbytes / secs / 1e6:.1f}" if secs > 0 else "-"


def clean_warnings(manifest: dict[str, Any], manifest_path: Path) -> list[str]:
    """One line per kind of read problem (with its count and examples) and per cleaning rule
    that dropped a large share of the input; the full list stays in the clean manifest."""
    from llmforge.console import WarningTally

    tally = WarningTally()
    for err in manifest.get("errors", []):
        where, _, what = err.rpartition(": ")
        tally.add(what or err, "/".join(Path(where).parts[-3:]) if where else "")
    lines = [f"skipped input: {line}" for line in tally.lines()]
    if lines:
        lines.append(f"every skipped input is listed in {manifest_path}")
    from llmforge.pipeline.clean import byte_drop_warnings

    return lines + byte_drop_warnings(manifest.get("stats", {}).get("counts", {}), threshold=0.10)


def dataset_line(ds_dir: Path) -> str:
    from llmforge.pipeline.shards import Dataset

    ds = Dataset.open(ds_dir)
    toks = ", ".join(f"{s}: {ds.num_tokens(s):,} tokens in {len(ds.shard_paths(s))} shards" for s in ds.splits())
    size = sum(p.stat().st_size for s in ds.splits() for p in ds.shard_paths(s))
    return f"{toks} ({human_bytes(size)} on disk)"
