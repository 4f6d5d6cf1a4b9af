"""Check a token dataset completely: every shard re-read and compared with the manifest.

For each shard: present, the size the manifest records, a valid Arrow file whose document offsets
increase inside the token buffer and whose documents each end with EOS, the recorded document and
token counts, the sha256 the manifest records, and every token id below the vocabulary size. Each
bad file is named on its own line; the exit code is 2 if any is bad (0 when all are good).

Training, evaluation and fine-tuning make the same checks when they open a dataset, but read a
shard's content only when it changed since it was last verified; this command re-reads all of it
(to catch damage below the filesystem, say). `llmforge prepare` remakes the damaged shards.

examples:
  llmforge verify shards/quickstart/tokens-0123456789abcdef
"""

from __future__ import annotations

import argparse

HELP = "re-check every shard of a token dataset (sha256, structure, token ids)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="a token dataset directory (tokens-*), as prepare prints it")


def run(args: argparse.Namespace) -> int:
    import time

    from llmforge.console import say
    from llmforge.errors import DataError
    from llmforge.pipeline.fsutil import human_bytes
    from llmforge.pipeline.shards import REMAKE, Dataset

    t0 = time.perf_counter()
    ds = Dataset.open(args.dataset, check=False)
    problems = ds.verify(full=True)
    paths = [p for split in ds.splits() for p in ds.shard_paths(split)]
    size = sum(s["size"] for split in ds.splits() for s in ds.manifest["splits"][split]["shards"])
    for line in problems:
        say(f"BAD {line}")
    if problems:
        bad = sorted({line.split(": ", 1)[0] for line in problems})
        raise DataError(f"{ds.root}: {len(bad)} of {len(paths)} files damaged ({', '.join(bad)}); {REMAKE}")
    tokens = sum(ds.num_tokens(s) for s in ds.splits())
    say(f"ok: {len(paths)} shards, {tokens:,} tokens, {human_bytes(size)} verified in "
        f"{time.perf_counter() - t0:.1f}s ({ds.root})")
    return 0
