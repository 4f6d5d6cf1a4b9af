"""Corpus specs: YAML under ``configs/corpus/`` validated into a typed :class:`CorpusSpec`.

A spec names its sources (http(s)/file URLs or local paths, with optional size/sha256), their
format, and the config of every data stage. ``load_corpus("quickstart")`` reads
``configs/corpus/quickstart.yaml``; any path to a YAML file works too. Strings may use
``${python_stdlib}`` (the running interpreter's standard library directory), ``${repo}``
(this checkout) and ``${ENV_VAR}``.
"""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from llmforge.config import Config, deep_merge, read_yaml
from llmforge.errors import ConfigError, NotFound, did_you_mean
from llmforge.pipeline.clean import CleanConfig
from llmforge.pipeline.download import SourceSpec
from llmforge.pipeline.neardup import NearDupConfig
from llmforge.pipeline.readers import ReadLimits
from llmforge.pipeline.tokenize import TokenizeConfig
from llmforge.pipeline.tokenizer import TokenizerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class SplitConfig(Config):

    val_fraction: float = Field(0.005, ge=0, lt=1, description="share of documents in the val split")
    min_val_documents: int = Field(4, ge=1, description="the val split takes at least this many documents "
                                   "(a corpus with too few for that is refused)")
    part_bytes: int = Field(64_000_000, gt=0, description="text bytes per cleaned part (= per shard)")


class CorpusSpec(Config):

    name: str
    description: str = ""
    sources: list[SourceSpec] = Field(min_length=1)
    format: str | None = Field(None, description="reader format for sources that don't set one (default: detect)")
    text_key: str = Field("text", description="JSON key / parquet column holding the text")
    max_documents: int | None = Field(None, gt=0, description="stop after this many input documents (for quick runs)")
    read: ReadLimits = Field(default_factory=ReadLimits, description="size caps that bound reading hostile input")
    clean: CleanConfig = Field(
        default_factory=CleanConfig,
        description="cleaning rules: a profile name (web, books, code, none) or a mapping with "
        "`profile:` and field overrides",
    )
    neardup: NearDupConfig = Field(default_factory=NearDupConfig,
                                   description="near-duplicate removal (MinHash LSH), off unless enabled")
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    notes: dict[str, Any] = Field(default_factory=dict, description="free-form facts (sizes, licences, mirrors)")

    @field_validator("clean", mode="before")
    @classmethod
    def _clean_profile_name(cls, v: Any) -> Any:
        """``clean: books`` is short for ``clean: {profile: books}``."""
        return {"profile": v} if isinstance(v, str) else v


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(obj: Any, where: str) -> Any:
    builtins = {"python_stdlib": sysconfig.get_paths()["stdlib"], "repo": str(REPO_ROOT)}

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name in builtins:
            return builtins[name]
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(f"{where}: unknown variable ${{{name}}} (set it in the environment)")

    if isinstance(obj, str):
        return _VAR.sub(repl, obj)
    if isinstance(obj, list):
        return [_substitute(x, where) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, where) for k, v in obj.items()}
    return obj


def corpus_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "corpus").glob("*.yaml"))


def resolve_corpus_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise NotFound(f"{p}: corpus spec not found")
        return p
    p = CONFIG_DIR / "corpus" / f"{name_or_path}.yaml"
    if not p.is_file():
        raise NotFound(f"--corpus {name_or_path}: " + did_you_mean(name_or_path, corpus_names(), "corpus")
                       + "; or give a YAML spec path, or --source URL_OR_PATH")
    return p


def load_corpus(name_or_path: str | None = None, *, sources: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> CorpusSpec:
    """Load a spec by name or path; ``sources`` (``--source``) adds/replaces its sources.

    With no spec but ``sources``, a spec named ``custom`` with default settings is built.
    ``overrides`` is a nested dict merged over the YAML (e.g. ``{"tokenizer": {"vocab_size": 8000}}``).
    """
    if name_or_path is None and not sources:
        raise ConfigError("give --corpus NAME_OR_YAML or at least one --source URL_OR_PATH")
    if name_or_path is not None:
        path = resolve_corpus_path(name_or_path)
        raw = read_yaml(path, "a corpus spec")
        where = str(path)
    else:
        raw, where = {"name": "custom"}, "--source"
    if sources:
        raw["sources"] = [{"url": s} for s in sources]
    raw = deep_merge(raw, overrides or {})
    raw = _substitute(raw, where)
    return CorpusSpec.load(raw, source=where)
