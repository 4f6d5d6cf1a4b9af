"""The best model per minute of compute: held-out bits per byte after a fixed wall-clock budget.

    .venv/bin/python bench/quality_per_minute.py                         # baseline, tiny, cpu-10min; 10m each
    .venv/bin/python bench/quality_per_minute.py --runs cpu-10min:3 --runs cpu-10min@5m
    .venv/bin/python bench/quality_per_minute.py --budget 3m --runs nanogpt-cpu --runs cpu-10min

The data: ../shared/corpus/gutenberg split BY AUTHOR. Every book of HELDOUT_AUTHORS is kept out of
training and scored; every other book is the training corpus. Both are prepared with the `books`
cleaning profile and one 8k SentencePiece vocabulary trained on the training authors only.

A run: `llmforge train --config RECIPE --time BUDGET` on the training authors (a fresh run
directory each time), then `llmforge evaluate` of its final checkpoint on EVERY token of the
held-out authors (bits per byte, which does not depend on the tokenizer). Each `--runs` entry is
RECIPE[@BUDGET][:REPEATS]; the table gives min/median/max over repeats and the ratio of the median
to the baseline recipe's median measured in the same invocation on the same machine (the first
recipe is the baseline unless --baseline names another).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "gutenberg"
HELDOUT_AUTHORS = ("Kafka, Franz", "Lockhart, Caroline")  # ~2.5 MB of text, every book of each is scored
VOCAB = 8192
DEFAULT_RUNS = ["nanogpt-cpu", "cpu-tiny", "cpu-10min:3", "cpu-10min@5m"]


def split_by_author(cache: Path, corpus: Path = CORPUS,
                    heldout: tuple[str, ...] = HELDOUT_AUTHORS) -> tuple[Path, Path]:
    """train.jsonl.zst (all other authors) and heldout.jsonl.zst (the ``heldout`` authors), made once.
    A book goes wherever its author goes, so no held-out author's text is ever trained on."""
    import zstandard

    train, held = cache / "corpus" / "train.jsonl.zst", cache / "corpus" / "heldout.jsonl.zst"
    if train.is_file() and held.is_file():
        return train, held
    if not (corpus / "MANIFEST.json").is_file():
        sys.exit(f"needs {corpus} (the team's shared corpus)")
    train.parent.mkdir(parents=True, exist_ok=True)
    authors = set()
    with open(str(train) + ".tmp", "wb") as ft, open(str(held) + ".tmp", "wb") as fh:
        wt = zstandard.ZstdCompressor(level=3).stream_writer(ft)
        wh = zstandard.ZstdCompressor(level=3).stream_writer(fh)
        for shard in sorted(corpus.glob("*.jsonl.zst")):
            with open(shard, "rb") as f:
                for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                    author = json.loads(line)["meta"]["author"]
                    authors.add(author)
                    (wh if author in heldout else wt).write(line.encode())
        wt.close()
        wh.close()
    missing = set(heldout) - authors
    if missing:
        for tmp in (str(train) + ".tmp", str(held) + ".tmp"):
            os.unlink(tmp)
        sys.exit(f"held-out authors not in the corpus: {sorted(missing)}")
    os.replace(str(train) + ".tmp", train)
    os.replace(str(held) + ".tmp", held)
    return train, held


def llmforge(args: list[str], env: dict, log: Path | None = None, timeout: float = 7200) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llmforge", *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if log is not None:
        log.write_text(r.stdout + "\n" + r.stderr)
    if r.returncode != 0:
        sys.exit(f"llmforge {' '.join(args[:3])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def prepare(cache: Path, env: dict) -> tuple[Path, Path]:
    """The training-authors dataset and the held-out-authors dataset (same tokenizer)."""
    train_src, held_src = split_by_author(cache)
    common = "clean: books\ntokenizer:\n  vocab_size: %d\n" % VOCAB
    (cache / "train.yaml").write_text(f"name: gutenberg-train\nsources:\n  - url: {train_src}\n{common}"
                                      "split:\n  val_fraction: 0.01\n")
    (cache / "heldout.yaml").write_text(f"name: gutenberg-heldout\nsources:\n  - url: {held_src}\n{common}"
                                        "split:\n  val_fraction: 0.0\n")
    shards = cache / "shards"
    llmforge(["prepare", "--corpus", str(cache / "train.yaml"), "--out", str(shards), "--no-progress"], env)
    (train,) = (shards / "gutenberg-train").glob("tokens-*")
    llmforge(["prepare", "--corpus", str(cache / "heldout.yaml"), "--out", str(shards), "--no-progress",
              "--tokenizer", str(train / "tokenizer.model")], env)
    (held,) = (shards / "gutenberg-heldout").glob("tokens-*")
    return train, held


@dataclass
class Result:
    recipe: str
    budget: str
    seconds: float  # the training loop's wall time
    tokens: int
    tok_s: float
    bpb: float


def run_once(recipe: str, budget: str, i: int, data: Path, held: Path, cache: Path, env: dict,
             extra: list[str], *, name: str | None = None, eval_tokens: int | None = None) -> Result:
    """Train ``recipe`` for ``budget`` (a duration like 10m, or a token count like 2M tokens) in a
    fresh run directory, then score its final checkpoint on the held-out authors."""
    out = cache / "runs" / f"{(name or recipe).replace('/', '_')}-{budget.replace(' ', '')}-{i}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time: nothing resumed
    limit = ["--tokens", budget.split()[0]] if budget.endswith("tokens") else ["--time", budget]
    llmforge(["train", "--data", str(data), "--config", recipe, *limit, "--out", str(out), "--no-prefect",
              "--sample-tokens", "0", "--no-log-checkpoints", *extra], env, log=out.with_suffix(".log"))
    summary = json.loads((out / "summary.json").read_text())
    cap = ["--max-tokens", str(eval_tokens)] if eval_tokens else []
    llmforge(["evaluate", summary["checkpoint"], "--data", str(held), "--split", "train", "--max-new-tokens", "0",
              "--no-prefect", "--out", str(out / "heldout.json"), "--dtype", "float32", *cap], env)
    result = json.loads((out / "heldout.json").read_text())["train"]
    tokens = summary["step"] * summary["tokens_per_step"]
    return Result(name or recipe, budget, summary["budget_spent_s"], tokens, tokens / summary["budget_spent_s"],
                  result["bits_per_byte"])


def parse_run(spec: str, default_budget: str) -> tuple[str, str, int]:
    name, _, repeats = spec.partition(":")
    name, _, budget = name.partition("@")
    return name, budget or default_budget, int(repeats or 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", action="append", default=None, metavar="RECIPE[@BUDGET][:REPEATS]",
                   help=f"recipes to run (default: {' '.join(DEFAULT_RUNS)})")
    p.add_argument("--budget", default="10m", help="wall-clock budget of each run (default: 10m)")
    p.add_argument("--baseline", default=None, help="recipe whose median the ratios divide by (default: the first)")
    p.add_argument("--cache", default=str(REPO / "bench" / "out" / "quality"), help="data and runs (git-ignored)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="passed to every `llmforge train`")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="score only this many held-out tokens (whole books first; default: every token) - for "
                        "quick screens, not for the table of record")
    args = p.parse_args(argv)
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMFORGE_"))}
    env.update(LLMFORGE_MLRUNS=str(cache / "mlruns"), PYTHONUNBUFFERED="1")
    t0 = time.time()
    data, held = prepare(cache, env)
    print(f"data: train authors {data}\n      held-out authors {', '.join(HELDOUT_AUTHORS)}: {held}\n"
          f"prepared in {time.time() - t0:.0f}s; machine: {os.cpu_count()} cores\n", flush=True)
    runs = [parse_run(r, args.budget) for r in (args.runs or DEFAULT_RUNS)]
    extra = [a for s in args.sets for a in ("--set", s)]
    results: dict[tuple[str, str], list[Result]] = {}
    for name, budget, repeats in runs:
        for i in range(repeats):
            r = run_once(name, budget, i, data, held, cache, env, extra, eval_tokens=args.eval_tokens)
            results.setdefault((name, budget), []).append(r)
            print(f"  {name} @{budget} #{i + 1}: {r.tokens:,} tokens in {r.seconds:.0f}s ({r.tok_s:,.0f} tok/s), "
                  f"held-out {r.bpb:.4f} bits/byte", flush=True)
    base_key = next(k for k in results if k[0] == (args.baseline or runs[0][0]))
    base = statistics.median(r.bpb for r in results[base_key])
    print(f"\n| recipe | budget | runs | train loop s | tokens | tokens/s | held-out bits/byte (min / median / max) "
          f"| vs {base_key[0]}@{base_key[1]} |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for (name, budget), rs in results.items():
        b = [r.bpb for r in rs]
        med = statistics.median(b)
        print(f"| {name} | {budget} | {len(rs)} | {statistics.median(r.seconds for r in rs):.0f} | "
              f"{statistics.median(r.tokens for r in rs):,.0f} | {statistics.median(r.tok_s for r in rs):,.0f} | "
              f"{min(b):.4f} / {med:.4f} / {max(b):.4f} | {med / base:.3f}x |")
    print(f"\ntotal {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
