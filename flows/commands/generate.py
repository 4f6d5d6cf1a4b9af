"""Generate text from a checkpoint, streaming it to stdout as tokens arrive.

The checkpoint alone is enough: it carries the model config, the weights and the tokenizer.
A run directory means its best.pt; models:/NAME/VERSION is a version in the MLflow model registry.

  llmforge generate runs/train-tiny-XXXX/best.pt --prompt "Once upon a time" --max-new-tokens 200
  llmforge generate ckpt.pt --prompt "The" --temperature 0        # greedy
  llmforge generate ckpt.pt --prompt "The" --top-p 0.9 --seed 1   # reproducible nucleus sampling
  llmforge generate models:/my-gpt/1 --prompt "The" --temperature 0

The prompt is echoed, then the continuation; timing goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

from llmforge.flows.options import add_sampling_options, sampling_from

HELP = "sample text from a checkpoint (KV-cached, streamed)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file (best.pt, ckpt-*.pt, a fine-tune's model.pt), a run directory, "
                   "an `llmforge export --format hf` directory, or a registered model (models:/NAME/VERSION)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default: 200)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda[:N]")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context each step")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation")
    add_sampling_options(p)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from llmforge.errors import ConfigError
    from llmforge.model.generate import IncrementalDecoder, generate, load_model
    from llmforge.model.runtime import check_device

    sampling = sampling_from(args)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    check_device(args.device)
    model, tok, meta = load_model(args.checkpoint, args.device)
    device = next(model.parameters()).device
    prompt_ids = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    block = model.config.block_size
    if len(prompt_ids) > block:
        print(f"note: prompt is {len(prompt_ids)} tokens; the model sees the last {block}", file=sys.stderr)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    if args.prompt and not args.no_echo:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    decoder = IncrementalDecoder(tok.decode)

    def stream(token: int) -> None:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    t0 = time.perf_counter()
    out = generate(model, idx, args.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, seed=sampling.seed, use_cache=not args.no_cache, eos_id=tok.eos_id,
                   stream=stream, vocab_limit=tok.vocab_size)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t0
    n = out.size(1) - len(prompt_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s on {device}; checkpoint step "
          f"{meta['step']}]", file=sys.stderr)
    return 0
