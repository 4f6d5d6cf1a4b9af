"""Training throughput per model preset beside a plain reference step, the evaluation scorer's
throughput, and the data loader's random-batch sampling rate.

    python bench/train_throughput.py                      # tiny, small, gpt2-124m on the best device
    python bench/train_throughput.py --presets gpt2-124m --compile
    python bench/train_throughput.py --presets tiny --steps 20 --device cpu
    python bench/train_throughput.py --data shards/tokens-XXXX   # sample from a real dataset

For each preset, in one process and on the same batches: the plain reference step of
``bench/reference_gpt.py`` (same shape, same weights: eager attention matmuls, non-fused AdamW, no
compile; ``tests/test_reference_step.py`` checks both compute the same loss), llmforge's step as
the trainer runs it (fused AdamW on CUDA, bf16 autocast on CUDA, torch.compile on CUDA by default,
the next batch prefetched to the GPU while the step runs), and the held-out scorer's forward-only
throughput (``model/evaluate.py``, batches of its default size). It prints tokens/s, the ratio to
the reference, MFU on a GPU in the runtime's peak table, and evaluation tokens/s over training's.
The loader line is ``ShardBatcher.get_batch`` alone on one core.

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


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for s in range(warmup):
        fn(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        fn(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def model_rate(preset: str, ds: Dataset, device: torch.device, batch_size: int, block_size: int | None,
               steps: int, warmup: int, compile: bool | None, reference: bool) -> dict:
    """tokens/s of llmforge's training step, of the plain reference step (same shape, batch and
    weights) and of llmforge's held-out scorer, on the same batches."""
    from llmforge.model.data import Prefetcher
    from llmforge.model.evaluate import score_batches
    from llmforge.model.loss import head_loss
    from llmforge.model.runtime import autocast

    sys.path.insert(0, str(Path(__file__).parent))
    from reference_gpt import from_config, load_llmforge_state, reference_step

    cfg = load_preset(preset, vocab_size=ds.vocab_size, block_size=block_size)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = resolve_dtype("auto", device)
    tokens = batch_size * cfg.block_size
    out = {"preset": preset, "params_M": model.num_params() / 1e6, "batch": f"{batch_size}x{cfg.block_size}"}

    batcher = ShardBatcher(ds, "train", cfg.block_size, batch_size, seed=0)
    if reference:
        try:
            ref = load_llmforge_state(from_config(cfg), init).to(device)
            ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))

            def ref_one(step: int) -> None:
                x, y = batcher.get_batch(step)
                reference_step(ref, ref_opt, x.to(device), y.to(device), dtype).item()

            out["ref_tokens_per_s"] = tokens / _timed(ref_one, steps, warmup, device)
            del ref, ref_opt
        except ValueError:
            out["ref_tokens_per_s"] = None

    # llmforge's engine, as the trainer runs it
    opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device.type)
    use_compile = compile if compile is not None else device.type == "cuda"
    step_model = torch.compile(model) if use_compile else model
    source = Prefetcher(batcher, 1, device) if device.type == "cuda" else batcher

    def one(step: int) -> None:
        x, y = source.get_batch(step)
        with autocast(device, dtype):  # the head inside the loss, chunk by chunk (model/loss.py)
            hidden, _ = step_model(x.to(device), hidden=True)
            loss, _ = head_loss(hidden, model.lm_head.weight, y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)  # no loss.item(): the trainer reads the loss at log time, not per step

    dt = _timed(one, steps, warmup, device)
    out["tokens_per_s"] = tokens / dt
    peak = peak_flops(device)
    out["mfu"] = out["tokens_per_s"] * model.flops_per_token(cfg.block_size) / peak if peak else None

    # the held-out scorer (forward only, no grad) on batches of the evaluation's default size
    from llmforge.model.evaluate import EVAL_BATCH_SIZE

    eval_batch = ShardBatcher(ds, "train", cfg.block_size, EVAL_BATCH_SIZE, seed=1)

    def ev(step: int) -> None:
        x, y = eval_batch.get_batch(step)
        score_batches(step_model, [(x, y)], device=device, dtype=dtype)

    out["eval_tokens_per_s"] = EVAL_BATCH_SIZE * cfg.block_size / _timed(ev, steps, warmup, device)
    return out


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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile llmforge's step (default: as the trainer, on with CUDA)")
    p.add_argument("--no-reference", action="store_true", help="skip the plain reference step")
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
        print("| preset | params | batch | reference tok/s | llmforge tok/s | vs reference | MFU | "
              "evaluate tok/s | evaluate / train |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for preset in [s.strip() for s in args.presets.split(",") if s.strip()]:
            block = args.block_size or load_preset(preset, vocab_size=ds.vocab_size).block_size
            batch = args.batch_size or (16 if gpu else max(1, 2048 // block))
            r = model_rate(preset, ds, device, batch, args.block_size, steps, warmup, args.compile,
                           not args.no_reference)
            ref, tok_s, ev = r.get("ref_tokens_per_s"), r["tokens_per_s"], r["eval_tokens_per_s"]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            ref_s, ratio = (f"{ref:,.0f}", f"{tok_s / ref:.2f}x") if ref else ("-", "-")
            print(f"| {r['preset']} | {r['params_M']:.1f}M | {r['batch']} | {ref_s} | {tok_s:,.0f} | {ratio} | {mfu} | "
                  f"{ev:,.0f} | {ev / tok_s:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
