"""Generate text from a checkpoint, streaming it to stdout as tokens arrive.

The checkpoint alone is enough: it carries the model config, the weights and the tokenizer.

  llmforge generate runs/tiny/checkpoints/best.pt --prompt "Once upon a time" --max-new-tokens 200
  llmforge generate ckpt.pt --prompt "The" --temperature 0        # greedy
  llmforge generate ckpt.pt --prompt "The" --top-p 0.9 --seed 1   # reproducible nucleus sampling

The prompt is echoed, then the continuation; timing goes to stderr.
"""

from __future__ import annotations

import argparse
import sys

HELP = "sample text from a checkpoint (KV-cached, streamed)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint file (ckpt-*.pt or best.pt)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda[:N]")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole context each step")
    parser.add_argument("--no-echo", action="store_true", help="print only the continuation")


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that are safe to print: text that
    ends in an incomplete UTF-8 sequence (byte-fallback pieces, U+FFFD) is held back until the
    remaining bytes arrive."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.emitted):
            delta = text[len(self.emitted):]
        else:  # never with our lossless tokenizer; print what follows the common prefix
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            delta = text[common:]
        self.emitted = text
        return delta


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from llmforge.model.checkpoint import CheckpointError
    from llmforge.model.generate import generate, load_for_inference
    from llmforge.pipeline.tokenizer import Tokenizer

    if args.max_new_tokens < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    try:
        model, sp, meta = load_for_inference(args.checkpoint, args.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = Tokenizer(sp.serialized_model_proto())  # lossless encode (see pipeline/tokenizer.py)
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
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache, eos_id=tok.eos_id,
                   stream=stream, vocab_limit=tok.vocab_size)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    dt = time.perf_counter() - t0
    n = out.size(1) - len(prompt_ids)
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s on {device}; checkpoint step "
          f"{meta['step']}]", file=sys.stderr)
    return 0
