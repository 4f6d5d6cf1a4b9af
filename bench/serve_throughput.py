"""Serving throughput: generated tokens/s of `llmforge serve` for 1 and 8 concurrent streams,
batched decoding against sequential (one forward pass per request, in turn).

    python bench/serve_throughput.py                          # tiny preset, random weights, CPU
    python bench/serve_throughput.py --preset small --tokens 64 --repeats 5
    python bench/serve_throughput.py --threads 1       # torch threads here and in the server

For each decoding mode a real server (`llmforge serve --decode MODE --port 0`) is started on a
checkpoint of the preset with random weights (speed does not depend on them) and a SentencePiece
tokenizer trained here on Python standard-library text. A round sends N streamed
/v1/completions requests at once (greedy, `--tokens` new tokens each, different prompts) from N
client threads and counts the tokens the server reports in `usage`; tokens/s is their sum over
the round's wall time. Each row is min/median/max over `--repeats` rounds after one warm-up
round, the two modes' rounds alternating (the machine may be shared); the ratio compares medians
with sequential decoding of one stream, measured in the same run. The engine rows time the
decoding engine alone (no HTTP), the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

import httpx
import torch

from llmforge.model.checkpoint import save_checkpoint
from llmforge.model.gpt import GPT, load_preset
from llmforge.pipeline.tokenizer import Tokenizer, TokenizerConfig, train_sentencepiece

PROMPTS = ["def main(", "import os\n", "class Node:", "# Copyright", "for i in range(", "return self.",
           "if __name__ ==", "try:\n    "]


def make_checkpoint(path: Path, preset: str, vocab_size: int) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:60]]
    proto = train_sentencepiece(texts, TokenizerConfig(vocab_size=vocab_size, threads=2))
    tok = Tokenizer(proto)
    torch.manual_seed(0)
    model = GPT(load_preset(preset, vocab_size=tok.vocab_size))
    return save_checkpoint(path, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None, step=0,
                           data_state={}, rng_state={}, config={"model": model.config.to_dict()}, lineage={},
                           tokenizer=proto)


def http_round(url: str, name: str, streams: int, tokens: int) -> tuple[int, float]:
    """(tokens generated, seconds) for ``streams`` concurrent streamed completions."""
    counts = [0] * streams
    barrier = threading.Barrier(streams + 1)

    def client(i: int) -> None:
        body = {"model": name, "prompt": PROMPTS[i % len(PROMPTS)] + str(i), "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        barrier.wait()
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        counts[i] = chunk["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def engine_round(engine, tok, streams: int, tokens: int) -> tuple[int, float]:
    from llmforge.model.serve import Job

    done = threading.Semaphore(0)
    counts = [0] * streams

    def emit(i: int):
        def f(ev: tuple) -> None:
            if ev[0] in ("end", "error"):
                counts[i] = ev[2] if ev[0] == "end" else 0
                done.release()
        return f

    t0 = time.perf_counter()
    for i in range(streams):
        engine.submit(Job(prompt=tok.encode(PROMPTS[i % len(PROMPTS)] + str(i)), max_tokens=tokens, emit=emit(i),
                          temperature=0))
    for _ in range(streams):
        done.acquire()
    return sum(counts), time.perf_counter() - t0


def measure(rounds: dict[str, Callable[[], tuple[int, float]]], repeats: int) -> dict[str, list[float]]:
    """tokens/s per mode; the modes' rounds alternate, so a change in the machine's load (it is
    shared) hits both alike. One warm-up round each first."""
    for run_round in rounds.values():
        run_round()
    rates: dict[str, list[float]] = {mode: [] for mode in rounds}
    for _ in range(repeats):
        for mode, run_round in rounds.items():
            n, dt = run_round()
            rates[mode].append(n / dt)
    return rates


def serve(checkpoint: Path, decode: str, slots: int, threads: int | None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "llmforge", "serve", str(checkpoint), "--port", "0", "--device",
                             "cpu", "--decode", decode, "--slots", str(slots)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ", 1)[1].split()[0], line.split()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    slots = max(args.streams)

    modes = ("sequential", "batched")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / f"bench-{args.preset}.pt", args.preset, args.vocab_size)
        from llmforge.model.generate import load_model
        from llmforge.model.serve import Engine

        model, tok, _ = load_model(ckpt, "cpu")
        print(f"{args.preset}: {model.num_params() / 1e6:.1f}M params, vocab {tok.vocab_size}, context "
              f"{model.config.block_size}; {args.tokens} new tokens per request; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores", flush=True)
        engines = {mode: Engine(model, tok, slots=slots, decode=mode).start() for mode in modes}
        for n in args.streams:
            rates = measure({m: partial(engine_round, e, tok, n, args.tokens) for m, e in engines.items()},
                            args.repeats)
            rows += [("engine", m, n, rates[m]) for m in modes]
        for e in engines.values():
            e.close()
        del model
        servers = {mode: serve(ckpt, mode, slots, args.threads) for mode in modes}
        try:
            for n in args.streams:
                rates = measure({m: partial(http_round, url, name, n, args.tokens)
                                 for m, (_, url, name) in servers.items()}, args.repeats)
                rows += [("http", m, n, rates[m]) for m in modes]
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    print(f"\n| path | decoding | streams | tokens/s min | median | max | x sequential, 1 stream |")
    print("|---|---|---|---|---|---|---|")
    for path in ("engine", "http"):
        base = statistics.median(next(r for p, d, n, r in rows if p == path and d == "sequential" and n == 1))
        for p, decode, n, rates in rows:
            if p == path:
                med = statistics.median(rates)
                print(f"| {path} | {decode} | {n} | {min(rates):,.0f} | {med:,.0f} | {max(rates):,.0f} | "
                      f"{med / base:.2f} |")


if __name__ == "__main__":
    main()
