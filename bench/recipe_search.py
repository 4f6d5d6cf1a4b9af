"""Ablations for the CPU recipe: one change at a time against a base recipe, scored like
bench/quality_per_minute.py (held-out authors' bits per byte), at a fixed TOKEN budget.

    .venv/bin/python bench/recipe_search.py --tokens 1M --eval-tokens 200000 --variants bench/recipe_variants.yaml

A token budget makes a comparison independent of how busy the machine is (the same tokens give the
same model); what a change costs in speed is measured separately (bench/train_throughput.py) and
the winners are then compared at equal wall time by bench/quality_per_minute.py. The variants file
maps a name to --set overrides of the base recipe; the table gives each variant's bits per byte
and its difference from the base's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality_per_minute as q  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="cpu-tiny", help="the recipe every variant changes (default: cpu-tiny)")
    p.add_argument("--variants", required=True, help="YAML: name -> list of KEY=VALUE (--set) overrides")
    p.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    p.add_argument("--tokens", default="1M", help="token budget of every run (default: 1M)")
    p.add_argument("--eval-tokens", type=int, default=200_000, help="held-out tokens scored (whole books first)")
    p.add_argument("--cache", default=str(q.REPO / "bench" / "out" / "quality"))
    p.add_argument("--set", action="append", default=["train.eval_every=0", "train.eval_tokens=16384"], dest="sets",
                   help="applied to every variant (default: no periodic validation, a small final one)")
    args = p.parse_args(argv)
    variants: dict[str, list[str]] = yaml.safe_load(Path(args.variants).read_text())
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    cache = Path(args.cache).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMFORGE_"))}
    env.update(LLMFORGE_MLRUNS=str(cache / "mlruns"), PYTHONUNBUFFERED="1")
    data, held = q.prepare(cache, env)
    budget = f"{args.tokens} tokens"
    rows = []
    for name, sets in variants.items():
        t0 = time.time()
        extra = [a for s in [*args.sets, *(sets or [])] for a in ("--set", s)]
        r = q.run_once(args.base, budget, 0, data, held, cache, env, extra, name=name, eval_tokens=args.eval_tokens)
        rows.append((name, sets, r))
        print(f"  {name}: {r.bpb:.4f} bits/byte ({r.tokens:,} tokens, {r.tok_s:,.0f} tok/s under the current load, "
              f"{time.time() - t0:.0f}s)", flush=True)
    base = next((r.bpb for n, _, r in rows if n == "base"), rows[0][2].bpb)
    print("\n| variant | change | held-out bits/byte | vs base |\n|---|---|---:|---:|")
    for name, sets, r in rows:
        print(f"| {name} | {' '.join(sets or []) or '-'} | {r.bpb:.4f} | {r.bpb - base:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
