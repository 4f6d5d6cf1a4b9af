"""Conversations with a model: the chat template fine-tuning stores, and the history a chat keeps.

**The template** is the checkpoint's ``extra["chat_template"]``: a Jinja string in Hugging Face's
``chat_template`` format (``messages`` of ``{"role", "content"}``, ``add_generation_prompt``,
``eos_token``), so the same string can go into an exported ``tokenizer_config.json`` or a GGUF's
``tokenizer.chat_template``. SFT fine-tuning stores :data:`model.sft.CHAT_TEMPLATE` there. It is
rendered the way ``transformers`` renders one (``ImmutableSandboxedEnvironment``, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``).

**EOS.** Our SentencePiece EOS is a control id, not text: encoding the string ``</s>`` would give
its characters. :func:`encode_chat` therefore renders with a random sentinel as ``eos_token`` and
puts the EOS id where it appears, so user text can never smuggle an EOS in.

**A conversation** (:class:`Conversation`) keeps the turns and builds each prompt so that prompt +
reply fit the model's context, dropping the oldest turns (never the system message) when they do
not. A model without a template is used for completion: the transcript is the typed lines and
the model's continuations, one after another, each typed line starting a new line of text.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence, TextIO

from llmforge.errors import CheckpointError, ConfigError

TEMPLATE_KEY = "chat_template"  # the checkpoint's extra[...] key (Hugging Face's name for it)

ROLES = ("system", "user", "assistant")


class ChatError(ConfigError):
    """A conversation the template refuses (roles out of order) or that cannot fit the context."""


def _raise(message: str) -> None:
    raise ChatError(message)


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise CheckpointError(f"the stored chat template is not valid Jinja: {e}") from None


def render_chat(template: str, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True,
                eos_token: str = "</s>", bos_token: str = "") -> str:
    """The text ``template`` makes of ``messages`` (as ``tokenizer.apply_chat_template(...,
    tokenize=False)`` would, given the same ``eos_token``)."""
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"a message needs a role ({', '.join(ROLES)}) and text content, got {dict(m)!r:.80}")
    return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                      eos_token=eos_token, bos_token=bos_token)


def encode_chat(tok: Any, template: str, messages: Sequence[dict[str, str]], *,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation, with the EOS id wherever the template puts
    ``eos_token`` (see the module docstring)."""
    sentinel = f"\x00eos-{uuid.uuid4().hex}\x00"
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt, eos_token=sentinel)
    ids: list[int] = []
    for i, part in enumerate(text.split(sentinel)):
        if i:
            ids.append(tok.eos_id)
        if part:
            ids.extend(tok.encode(part))
    return ids


def eos_piece(tok: Any) -> str:
    """How the EOS id is written in text (``</s>``)."""
    return tok.sp.id_to_piece(tok.eos_id)


# ---------------------------------------------------------------------------------------------
# a conversation within the context window


@dataclass
class Turn:
    user: str
    reply: str


@dataclass
class Conversation:
    """The turns of one chat and the prompt for the next. ``reply_tokens`` is the room kept for
    the reply: a prompt gets ``block_size - reply_tokens`` tokens at most."""

    tok: Any
    template: str | None
    block_size: int
    reply_tokens: int
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.reply_tokens < self.block_size:
            raise ConfigError(f"a reply of {self.reply_tokens} tokens leaves no room for the prompt in the model's "
                              f"context of {self.block_size} tokens")
        if self.system and self.template is None:
            raise ConfigError("--system needs a model with a chat template (a fine-tuned one); this model "
                              "continues text")

    @property
    def budget(self) -> int:
        return self.block_size - self.reply_tokens

    def messages(self, user: str, turns: Sequence[Turn] | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns if turns is None else turns:
            out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.reply}]
        return out + [{"role": "user", "content": user}]

    def render(self, user: str, turns: Sequence[Turn] | None = None) -> str:
        """The prompt as text (EOS written as its piece): what ``--show-prompt`` prints."""
        turns = self.turns if turns is None else turns
        if self.template is None:
            return "\n".join([t.user + t.reply for t in turns] + [user])
        return render_chat(self.template, self.messages(user, turns), eos_token=eos_piece(self.tok))

    def encode(self, user: str, turns: Sequence[Turn] | None = None) -> list[int]:
        turns = self.turns if turns is None else turns
        if self.template is None:
            return self.tok.encode(self.render(user, turns))
        return encode_chat(self.tok, self.template, self.messages(user, turns))

    def prompt(self, user: str) -> tuple[list[int], int]:
        """(token ids of the next prompt, how many of the oldest turns were dropped to fit it).
        The dropped turns are forgotten for the rest of the chat."""
        dropped = 0
        ids = self.encode(user)
        while len(ids) > self.budget and self.turns:
            self.turns.pop(0)
            dropped += 1
            ids = self.encode(user)
        if len(ids) > self.budget:
            raise ChatError(f"this message makes a prompt of {len(ids)} tokens; with {self.reply_tokens} for the "
                            f"reply the model's context of {self.block_size} tokens holds {self.budget}")
        return ids, dropped

    def add(self, user: str, reply: str) -> None:
        self.turns.append(Turn(user, reply))

    def reset(self) -> None:
        self.turns.clear()


# ---------------------------------------------------------------------------------------------
# the interactive loop (stdin/stdout, works through a pipe)

COMMANDS = {"/reset": "forget the conversation", "/exit": "leave (so does Ctrl-D)", "/quit": "leave"}


def chat_loop(conv: Conversation, reply: Callable[[list[int], Callable[[str], None]], str], *,
              lines: Iterable[str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
              show_prompt: bool = False, interactive: bool = False) -> int:
    """Read lines, answer each through ``reply(prompt_ids, write)`` (which streams the reply's text
    through ``write`` and returns it), keep the history. Returns the number of turns answered.

    Replies go to ``out``; notices (dropped turns, /reset, ``--show-prompt``) to ``err``, one line
    each, so a pipe's stdout carries only the model's words."""
    out = out or sys.stdout
    err = err or sys.stderr
    lines = sys.stdin if lines is None else lines
    answered = 0

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    it = iter(lines)
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        try:
            line = next(it)
        except StopIteration:
            break
        line = line.rstrip("\r\n")
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            conv.reset()
            print("[history cleared]", file=err, flush=True)
            continue
        if not cmd:
            continue
        try:
            ids, dropped = conv.prompt(line)
        except ChatError as e:
            print(f"[{e}]", file=err, flush=True)
            continue
        if dropped:
            print(f"[dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the {conv.block_size}-token "
                  f"context]", file=err, flush=True)
        if show_prompt:
            print(f"[prompt] {conv.render(line)!r}", file=err, flush=True)
        try:
            text = reply(ids, write)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            write("\n")
            print("[reply interrupted; not kept in the history]", file=err, flush=True)
            continue
        write("\n")
        conv.add(line, text)
        answered += 1
    return answered
