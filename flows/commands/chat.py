"""Chat with a model in the terminal, or through a pipe: replies stream as they are generated.

A fine-tuned model (llmforge finetune --sft) carries its chat template, and each message you type
is a user turn of one conversation: the model sees the history laid out as it was trained
(### Instruction: / ### Response: blocks), as much of it as fits in its context (the oldest turns
are dropped, with a notice). A pretrained model has no template and continues text: each line you
type goes on a new line after the text so far, and the model continues it.

  llmforge chat runs/finetune-full-XXXX/model.pt
  llmforge chat models:/my-gpt/2 --system "Answer in one sentence." --temperature 0.7 --top-k 40
  printf 'What is json for?\\n/reset\\nWhat is csv for?\\n' | llmforge chat model.pt --temperature 0

Type /reset to forget the conversation, /exit (or Ctrl-D) to leave; Ctrl-C stops a reply.
Replies go to stdout, notices to stderr; --show-prompt prints each prompt exactly as the model
sees it (EOS written as </s>).
"""

from __future__ import annotations

import argparse
import sys

from llmforge.flows.options import add_sampling_options, sampling_from

HELP = "chat with a model (its stored chat template, streamed, history within the context)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint (a fine-tune's model.pt, best.pt), a run directory, an "
                   "`llmforge export --format hf` directory, or models:/NAME/VERSION")
    p.add_argument("--system", default=None, help="a system message put before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="longest reply in tokens (default: half the model's context, at most 256)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda[:N]")
    p.add_argument("--show-prompt", action="store_true", help="print each prompt the model sees to stderr")
    add_sampling_options(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from llmforge.errors import ConfigError
    from llmforge.model.chat import Conversation, chat_loop
    from llmforge.model.generate import IncrementalDecoder, generate, load_model
    from llmforge.model.runtime import check_device

    sampling = sampling_from(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    check_device(args.device)
    model, tok, meta = load_model(args.model, args.device)
    block = model.config.block_size
    reply_tokens = args.max_new_tokens or min(256, block // 2)
    if reply_tokens >= block:
        raise ConfigError(f"--max-new-tokens {reply_tokens}: must be below the model's context of {block} tokens "
                          f"(the prompt needs room)")
    template = meta.get("chat_template")
    conv = Conversation(tok, template, block, reply_tokens, system=args.system)
    device = next(model.parameters()).device
    turn = [0]

    def reply(ids: list[int], write) -> str:
        decoder = IncrementalDecoder(tok.decode)
        seed = None if sampling.seed is None else sampling.seed + turn[0]  # reproducible, yet not the same each turn
        turn[0] += 1
        generate(model, torch.tensor([ids], dtype=torch.long, device=device), reply_tokens,
                 temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=seed,
                 eos_id=tok.eos_id, vocab_limit=tok.vocab_size, stream=lambda t: write(decoder.push(t)))
        write(decoder.flush())
        return tok.decode(decoder.ids)

    interactive = sys.stdin.isatty()
    if interactive or args.show_prompt:
        how = "its chat template" if template else "no chat template: each line continues the text"
        print(f"chatting with {meta['name']} ({how}; context {block} tokens, replies up to {reply_tokens}). "
              f"/reset forgets, /exit or Ctrl-D leaves.", file=sys.stderr, flush=True)
    chat_loop(conv, reply, show_prompt=args.show_prompt, interactive=interactive)
    return 0
