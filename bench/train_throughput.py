"""Training throughput per model preset, and the data loader's random-batch sampling rate.

    python bench/train_throughput.py                      # tiny, small, gpt2-124m on the best device
    python bench/train_throughput.py --presets tiny --steps 20 --device cpu
    python bench/train_throughput.py --data shards/tokens-XXXX   # sample from a real dataset

For each preset it times full optimizer steps (forward, backward, clip, AdamW step, with the
trainer's dtype policy: bf16 autocast on CUDA, fp32 on CPU) on batches drawn by
:class:`model.data.ShardBatcher`, after ``--warmup`` untimed steps, and prints tokens/s and, on
a GPU in the trainer's peak table, MFU. The loader line is ``ShardBatcher.get_batch`` alone on
one core (``torch.set_num_threads(1)``), over shards memory-mapped from disk.

Without ``--data`` a throwaway dataset of uniformly random tokens (vocabulary ``--vocab-size``)
is written to a temp directory through the real shard writer: content does not change speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmforge.model.data import ShardBatcher
from llmforge.model.gpt import GPT, load_preset
from llmforge.model.runtime import DistInfo, peak_flops, resolve_device, resolve_dtype
from llmforge.pipeline.fsutil import fingerprint
from llmforge.pipeline.shards import Dataset, split_summary, token_dtype, write_manifest, write_shard


def random_dataset(root: Path, vocab_size: int, tokens: int, shards: int = 4) -> Path:
    """A token dataset of random ids (documents of ~2k tokens) written by the real writer."""
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab_size)
    entries = []
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(b"")  # not used by the benchmark
    per = tokens // shards
    for k in range(shards):
        toks = rng.integers(3, vocab_size, size=per, dtype=np.int64).astype(dtype)
        lengths = np.full(per // 2048, 2048)
        lengths[-1] += per - lengths.sum()
        toks[np.cumsum(lengths) - 1] = 2  # EOS ends each document
        entries.append(write_shard(root / "train" / f"train-{k:05d}.arrow", [f"d{i}" for i in range(len(lengths))],
                                   lengths * 4, toks, lengths, eos_id=2))
    summary = split_summary(entries)
    write_manifest(root, {"fingerprint": fingerprint("bench", summary), "token_dtype": dtype.name,
                          "tokenizer": {"file": "tokenizer.model", "vocab_size": vocab_size, "eos_id": 2,
                                        "fingerprint": "none"},
                          "splits": {"train": summary}})
    return root


def loader_rate(ds: Dataset, block_size: int, batch_size: int, seconds: float = 2.0) -> float:
    """Tokens/s of ShardBatcher.get_batch on one core (CPU tensors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    b = ShardBatcher(ds, "train", block_size, batch_size, seed=0)
    for s in range(20):  # touch pages once so we time sampling, not the first disk reads
        b.get_batch(s)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b.get_batch(n)
        n += 1
    rate = n * batch_size * block_size / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def model_rate(preset: str, ds: Dataset, device: torch.device, batch_size: int, block_size: int | None,
               steps: int, warmup: int, compile: bool) -> dict:
    cfg = load_preset(preset, vocab_size=ds.vocab_size, block_size=block_size)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
    dtype = resolve_dtype("auto", device)
    step_model = torch.compile(model) if compile else model
    batcher = ShardBatcher(ds, "train", cfg.block_size, batch_size, seed=0, device=device)

    def one(step: int) -> None:
        x, y = batcher.get_batch(step)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer syncs once per step to check the loss is finite

    for s in range(warmup):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = steps * batch_size * cfg.block_size / dt
    peak = peak_flops(device)
    return {
        "preset": preset,
        "params_M": model.num_params() / 1e6,
        "batch": f"{batch_size}x{cfg.block_size}",
        "step_s": dt / steps,
        "tokens_per_s": tok_s,
        "mfu": tok_s * model.flops_per_token() / peak if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,gpt2-124m")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, help="a token dataset directory (default: random tokens in a temp dir)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default: 16 on GPU; on CPU 2048 tokens' worth, at least 1)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the random-token dataset")
    p.add_argument("--block-size", type=int, default=None, help="default: each preset's own")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model steps")
    args = p.parse_args(argv)

    device = resolve_device(args.device, DistInfo())
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    with tempfile.TemporaryDirectory(prefix="llmforge-bench-") as tmp:
        ds = Dataset.open(args.data) if args.data else Dataset.open(random_dataset(Path(tmp) / "ds", args.vocab_size, 40_000_000))
        name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
        print(f"device: {name}; torch {torch.__version__}; data: {ds.root} ({ds.num_tokens('train'):,} tokens)\n")
        rate = loader_rate(ds, 1024, 32)
        print(f"loader: ShardBatcher random batches 32x1024, one core: {rate / 1e6:,.1f}M tokens/s\n")
        header = f"{'preset':<10} {'params':>9} {'batch':>9} {'s/step':>8} {'tokens/s':>12} {'MFU':>7}"
        print(header)
        print("-" * len(header))
        for preset in [s.strip() for s in args.presets.split(",") if s.strip()]:
            block = args.block_size or load_preset(preset, vocab_size=ds.vocab_size).block_size
            batch = args.batch_size or (16 if gpu else max(1, 2048 // block))
            r = model_rate(preset, ds, device, batch, args.block_size, steps, warmup, args.compile)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['preset']:<10} {r['params_M']:>8.1f}M {r['batch']:>9} {r['step_s']:>8.3f} "
                  f"{r['tokens_per_s']:>12,.0f} {mfu:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
