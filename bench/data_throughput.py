"""Throughput of each data stage on the first 100 MB of ../shared/corpus/gutenberg.

    .venv/bin/python bench/data_throughput.py [--mb 100] [--workers N] [--corpus DIR]

Prints one table: input MB/s per stage (download over a local HTTP server, extract+clean,
dedup/split, train_tokenizer, tokenize), and for tokenize the ceiling: the raw SentencePiece
encode rate of the same text with the same model on the same cores, and the ratio. Then the
whole flow through `llmforge prepare` against a running Prefect server: a first run, and a
re-run of the finished flow (everything skipped). Targets (issue 2): tokenize >= 0.85 of the
ceiling, clean >= 10 MB/s per core, a finished re-run under 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from llmforge.pipeline import extract, tokenize, tokenizer  # noqa: E402
from llmforge.pipeline.config import load_corpus  # noqa: E402
from llmforge.pipeline.download import SourceSpec, fetch  # noqa: E402
from llmforge.pipeline.tokenizer import Tokenizer, _chunks  # noqa: E402


def take_first_mb(corpus: Path, mb: float, out: Path) -> dict[str, int]:
    """Copy whole jsonl lines of the corpus shards, in order, until ``mb`` MB of text; one file per
    shard. Returns each written file's name -> its UTF-8 text bytes."""
    files: dict[str, int] = {}
    budget = int(mb * 1e6)
    for src in sorted(corpus.glob("*.jsonl.zst")):
        if budget <= 0:
            break
        dst = out / src.name
        lines = []
        text_bytes = 0
        with zstandard.open(src, "rt", encoding="utf-8") as f:
            for line in f:
                n = len(json.loads(line)["text"].encode())
                if n > budget and lines:
                    budget = 0
                    break
                lines.append(line)
                budget -= n
                text_bytes += n
        with zstandard.open(dst, "wt", encoding="utf-8") as f:
            f.writelines(lines)
        files[dst.name] = text_bytes
    return files


def _clean(args):
    unit, cfg, out = args
    return extract.clean_unit(unit, cfg, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "gutenberg"))
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--skip-flow", action="store_true", help="don't run the Prefect flow part")
    args = ap.parse_args()
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"{corpus}: corpus not found", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmforge-bench-") as tmp:
        tmp = Path(tmp)
        www = tmp / "www"
        www.mkdir()
        files = take_first_mb(corpus, args.mb, www)
        in_bytes = sum((www / name).stat().st_size for name in files)

        # download over a real local HTTP server
        from support.http import TestHTTPServer

        with TestHTTPServer(www) as server:
            t0 = time.time()
            for name in files:
                fetch(SourceSpec(url=server.url(name)), tmp / "dl", progress=False)
            secs = time.time() - t0
        rows.append(("download (http, compressed)", in_bytes, secs, ""))

        spec = load_corpus("gutenberg", sources=[str(tmp / "dl")],
                           overrides={"tokenizer": {"vocab_size": args.vocab_size}})
        downloads = [{"path": str(tmp / "dl"), "sha256": None}]
        spec.sources[0].include = ["*.jsonl.zst"]
        extract.UNIT_BYTES = 1  # one unit per file, so units run in parallel
        units = extract.plan_units(downloads, spec)
        text_in = sum(files.values())
        clean_dir = tmp / "clean"

        # clean: one core first (the per-core rate, steady state: after one warm-up pass that
        # pays the one-time imports and regex compilation), then all workers
        extract.clean_unit(units[0], spec.clean, tmp / "clean0")
        t0 = time.time()
        extract.clean_unit(units[0], spec.clean, tmp / "clean1")
        secs1 = time.time() - t0
        unit0_text = sum(files[rel] for rel, _, _ in units[0]["files"])
        rows.append(("extract+clean, 1 core", unit0_text, secs1, "per core, steady"))
        t0 = time.time()
        with ProcessPoolExecutor(args.workers) as ex:
            list(ex.map(_clean, [(u, spec.clean, clean_dir) for u in units]))
        secs = time.time() - t0
        rows.append((f"extract+clean, {args.workers} procs", text_in, secs, ""))

        t0 = time.time()
        cm = extract.finalize(clean_dir, units, spec.split, fp="bench")
        rows.append(("dedup+split+repack", text_in, time.time() - t0, ""))
        kept = sum(s["text_bytes"] for s in cm["splits"].values())

        t0 = time.time()
        tm = tokenizer.train_tokenizer(extract.iter_texts(clean_dir, cm, "train"),
                                       cm["splits"]["train"]["text_bytes"], spec.tokenizer, tmp / "tok")
        rows.append((f"train_tokenizer (vocab {tm['vocab_size']})", tm["stats"]["sample_bytes"], time.time() - t0, ""))

        tok_path = tmp / "tok" / "tokenizer.model"
        parts = [p for s in ("train", "val") for p in extract.part_paths(clean_dir, cm, s)]
        t0 = time.time()
        for p in parts:
            tokenize.tokenize_part(p, tmp / "tokens" / p.parent.name, tok_path, spec.tokenize)
        tok_secs = time.time() - t0
        rows.append(("tokenize -> shards", kept, tok_secs, ""))

        # ceiling: the same texts, the same pieces, the same model and cores; encode only
        tok = Tokenizer.load(tok_path)
        texts = [t for s in ("train", "val") for t in extract.iter_texts(clean_dir, cm, s)]
        pieces = [c for t in texts for c in (_chunks(t, spec.tokenize.piece_chars)
                                             if len(t) > spec.tokenize.piece_chars else [t])]
        t0 = time.time()
        tok.sp.encode(pieces, num_threads=os.cpu_count())
        ceil_secs = time.time() - t0
        rows.append(("  ceiling: raw SentencePiece encode", kept, ceil_secs, ""))
        ratio = ceil_secs / tok_secs

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()}; input: first {args.mb:.0f} MB of text of {corpus}\n")
    print(f"| {'stage':40s} | {'input MB':>9s} | {'seconds':>8s} | {'MB/s':>7s} | note |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|{'-' * 9}|------|")
    for name, nbytes, secs, note in rows:
        print(f"| {name:40s} | {nbytes / 1e6:9.1f} | {secs:8.2f} | {nbytes / secs / 1e6:7.2f} | {note} |")
    print(f"\ntokenize / ceiling = {ratio:.3f}  (target >= 0.85)")
    print(f"clean per core = {_rate(rows, 'extract+clean, 1 core'):.1f} MB/s  (target >= 10)")

    if not args.skip_flow:
        flow_rows = run_flow(corpus, args)
        print(f"\n| {'flow via `llmforge prepare` (Prefect server running)':52s} | {'seconds':>8s} |")
        print(f"|{'-' * 54}|{'-' * 10}|")
        for name, secs in flow_rows:
            print(f"| {name:52s} | {secs:8.2f} |")
        print("\n(re-run target: under 15 s)")
    return 0


def _rate(rows, name) -> float:
    for n, b, s, _ in rows:
        if n == name:
            return b / s / 1e6
    return float("nan")


def run_flow(corpus: Path, args) -> list[tuple[str, float]]:
    from llmforge.flows.services import PrefectServer

    out = []
    with tempfile.TemporaryDirectory(prefix="llmforge-bench-flow-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        take_first_mb(corpus, args.mb, data)
        server = PrefectServer(tmp / "prefect").start()
        try:
            env = {**os.environ, **server.env, "LLMFORGE_MLRUNS": str(tmp / "mlruns")}
            cmd = [str(Path(sys.executable).parent / "llmforge"), "prepare", "--corpus", "gutenberg",
                   "--source", str(data), "--out", str(tmp / "shards"), "--no-progress",
                   "--vocab-size", str(args.vocab_size)]
            for name in ("first run (all stages)", "re-run of the finished flow"):
                t0 = time.time()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                out.append((name, time.time() - t0))
        finally:
            server.stop()
    return out


if __name__ == "__main__":
    sys.exit(main())
