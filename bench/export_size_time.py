"""Export time and size per format, for the tiny and gpt2-124m shapes with random weights.

    python bench/export_size_time.py                       # tiny and gpt2-124m, 3 repeats
    python bench/export_size_time.py --presets tiny --repeats 5

Each preset is built with ``mlp=swiglu`` (the Llama shape; vocabulary 8192 for tiny, 50257 for
gpt2-124m) and random weights, saved as a checkpoint with a small real SentencePiece tokenizer,
and exported as hf float32, hf bfloat16, gguf f16 and gguf q8_0 into fresh directories. An
export's time is the whole of ``llmforge export``'s work: building the stage (hashing and
loading the checkpoint, checking the model) and writing. The baseline, measured in the same run
on the same disk, is ``torch.save`` of the model's float32 state dict (what any export must at
least read and write); ratios are of medians. Min/median/max over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from llmforge.model.checkpoint import capture_rng_state, save_checkpoint
from llmforge.model.export import ExportConfig, ExportStage
from llmforge.model.gpt import GPT, load_preset
from llmforge.pipeline.fsutil import _sha256
from llmforge.pipeline.tokenizer import Tokenizer, TokenizerConfig, sample_texts, train_sentencepiece

VOCAB = {"tiny": 8192, "gpt2-124m": 50257}
FORMATS = {"hf float32": dict(format="hf", dtype="float32"), "hf bfloat16": dict(format="hf", dtype="bfloat16"),
           "gguf f16": dict(format="gguf", type="f16"), "gguf q8_0": dict(format="gguf", type="q8_0")}


def tokenizer() -> Tokenizer:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f"{m}.py").read_text(encoding="utf-8") for m in ("argparse", "textwrap", "difflib", "random")]
    cfg = TokenizerConfig(vocab_size=1000, threads=os.cpu_count())
    return Tokenizer(train_sentencepiece(sample_texts(texts, sum(len(t) for t in texts), cfg), cfg))


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(VOCAB), choices=list(VOCAB))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    tok = tokenizer()
    print(f"{'preset':<10} {'params':>7} {'what':<12} {'time s min/med/max':>21} {'x torch.save':>12} "
          f"{'size MB':>8} {'x fp32':>6}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for preset in args.presets:
            torch.manual_seed(0)
            model = GPT(load_preset(preset, vocab_size=VOCAB[preset], mlp="swiglu"))
            state = model.state_dict()
            run_dir = Path(tmp) / preset
            ckpt = save_checkpoint(run_dir / "best.pt", model_state=state, optimizer_state=None, scheduler_state=None,
                                   step=0, data_state={}, rng_state=capture_rng_state(),
                                   config={"model": model.config.to_dict()}, lineage={}, tokenizer=tok.proto)
            params = f"{model.num_params(non_embedding=False) / 1e6:.1f}M"
            base_t, base_size = [], 0
            for k in range(args.repeats):
                t0 = time.perf_counter()
                torch.save(state, run_dir / f"state-{k}.pt")
                os.sync()
                base_t.append(time.perf_counter() - t0)
                base_size = size(run_dir / f"state-{k}.pt")
                (run_dir / f"state-{k}.pt").unlink()
            lo, med_base, hi = stats(base_t)
            print(f"{preset:<10} {params:>7} {'torch.save':<12} {lo:>6.2f} {med_base:>6.2f} {hi:>6.2f}   {1.0:>10.2f} "
                  f"{base_size / 1e6:>8.1f} {1.0:>6.2f}", flush=True)
            for what, fmt in FORMATS.items():
                times, nbytes = [], 0
                for k in range(args.repeats):
                    out = run_dir / (f"out-{k}.gguf" if fmt["format"] == "gguf" else f"out-{k}")
                    _sha256.cache_clear()  # hash the checkpoint every time, as a new command does
                    t0 = time.perf_counter()
                    ExportStage(ckpt, ExportConfig(**fmt), out=out).run()
                    os.sync()
                    times.append(time.perf_counter() - t0)
                    nbytes = size(out)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
                lo, med, hi = stats(times)
                print(f"{'':<10} {'':>7} {what:<12} {lo:>6.2f} {med:>6.2f} {hi:>6.2f}   {med / med_base:>10.2f} "
                      f"{nbytes / 1e6:>8.1f} {nbytes / base_size:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
