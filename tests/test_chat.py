"""`llmforge chat`: the chat template fine-tuning stores, and conversations through stdin/stdout.

The SFT model is a real fine-tune (tests/test_finetune.py's tiny setup, a few seconds) of a small
pretrained base; the scripted conversation goes through the real command over a pipe.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.flows.cli import main as cli_main
from llmforge.model import sft
from llmforge.model.chat import ChatError, Conversation, encode_chat, render_chat
from llmforge.model.checkpoint import load_checkpoint
from llmforge.model.generate import load_model
from test_finetune import SFT_FILE, base_checkpoint, finetune, quick

torch.set_num_threads(1)
LLMFORGE = str(Path(sys.executable).parent / "llmforge")
BLOCK = 96


@pytest.fixture(scope="module")
def tok():
    from test_evaluate import make_tokenizer

    examples, _ = sft.load_sft_jsonl(SFT_FILE)
    return make_tokenizer(extra_text="".join(e.prompt_text() + e.response + "\n" for e in examples), vocab_size=400)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok) -> dict[str, Path]:
    """A pretrained base (no template) and its SFT fine-tune, context BLOCK tokens."""
    root = tmp_path_factory.mktemp("chat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFORGE_MLRUNS", str(root / "mlruns"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("LLMFORGE_PARENT_RUN_ID", raising=False)
        base, _ = base_checkpoint(root, tok, block_size=BLOCK)
        finetune(base, sft_file=SFT_FILE, out_dir=root / "ft", cfg=quick("full", steps=10))
    return {"base": base, "sft": root / "ft" / "model.pt", "mlruns": root / "mlruns"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------
# the template


@pytest.mark.parametrize("question", ["What did the cat do?", "  spaced\n\nlines {{ not jinja }} {% raw %}",
                                      "déjà vu 🦊"])
def test_template_renders_format_prompt_byte_for_byte_for_one_user_turn(question):
    assert render_chat(sft.CHAT_TEMPLATE, [user(question)]) == sft.format_prompt(question)
    assert render_chat(sft.CHAT_TEMPLATE, [user(question)], add_generation_prompt=False) == \
        sft.format_prompt(question).removesuffix(sft.RESPONSE_HEADER)


def test_history_is_laid_out_as_sft_packs_training_examples(tok):
    a = sft.SFTExample("What did the cat do?", "The cat chased the mouse.")
    b = sft.SFTExample("What did the dog do?", "The dog fetched the ball.")
    messages = [user(a.prompt), assistant(a.response), user(b.prompt), assistant(b.response), user("And the bird?")]
    text = render_chat(sft.CHAT_TEMPLATE, messages, eos_token="</s>")
    assert text == (a.prompt_text() + a.response + "</s>" + b.prompt_text() + b.response + "</s>"
                    + sft.format_prompt("And the bird?"))
    # token for token what training saw: each example's ids (EOS as the id) back to back, then the prompt
    ids = encode_chat(tok, sft.CHAT_TEMPLATE, messages)
    expected = sft.encode_example(tok, a, tok.eos_id)[0] + sft.encode_example(tok, b, tok.eos_id)[0]
    assert ids == expected + tok.encode(sft.format_prompt("And the bird?"))
    with_system = render_chat(sft.CHAT_TEMPLATE, [{"role": "system", "content": "Be brief."}, user("Hi")])
    assert with_system == "Be brief.\n\n" + sft.format_prompt("Hi")


def test_text_that_spells_eos_stays_text(tok):
    ids = encode_chat(tok, sft.CHAT_TEMPLATE, [user("say </s> now")])
    assert tok.eos_id not in ids and tok.decode(ids) == sft.format_prompt("say </s> now")


def test_template_refuses_roles_out_of_order():
    with pytest.raises(ChatError, match="roles must alternate"):
        render_chat(sft.CHAT_TEMPLATE, [user("a"), user("b")])
    with pytest.raises(ChatError, match="roles must alternate"):
        render_chat(sft.CHAT_TEMPLATE, [assistant("a")])
    with pytest.raises(ChatError, match="a message needs a role"):
        render_chat(sft.CHAT_TEMPLATE, [{"role": "tool", "content": "x"}])


def test_conversation_drops_the_oldest_turns_to_fit_and_keeps_the_system_message(tok):
    conv = Conversation(tok, sft.CHAT_TEMPLATE, block_size=128, reply_tokens=16, system="Be brief.")
    for i in range(6):
        conv.add(f"What did the cat do {i}?", "The cat chased the mouse.")
    assert len(conv.encode("What did the dog do?")) > 112
    ids, dropped = conv.prompt("What did the dog do?")
    assert 0 < dropped < 6 and len(conv.turns) == 6 - dropped and len(ids) <= 112
    assert len(conv.encode("What did the dog do?", [conv.turns[0].__class__("What did the cat do 0?", "The cat "
                                                                          "chased the mouse."), *conv.turns])) > 112
    assert conv.turns[0].user == f"What did the cat do {dropped}?"  # the oldest went first
    assert conv.render("What did the dog do?").startswith(f"Be brief.\n\n### Instruction:\nWhat did the cat do {dropped}?")
    with pytest.raises(ChatError, match="the model's context of 128 tokens holds 112"):
        conv.prompt("cat " * 200)


# ---------------------------------------------------------------------------------------------
# fine-tuning stores it; the command uses it


def test_sft_fine_tune_stores_the_chat_template_and_a_base_model_has_none(models):
    assert load_checkpoint(models["sft"])["extra"]["chat_template"] == sft.CHAT_TEMPLATE
    assert load_model(models["sft"], "cpu")[2]["chat_template"] == sft.CHAT_TEMPLATE
    assert load_model(models["base"], "cpu")[2]["chat_template"] is None


def test_scripted_chat_uses_the_template_resets_and_drops_the_oldest_turns(models, tok):
    questions = ["What did the cat do?", "What did the dog do?", "What did the bird do?", "What did the fish do?",
                 "What did the child do?", "What did the cat do?"]
    script = "\n".join([questions[0], questions[1], "/reset", *questions[2:], "/exit", "never read"]) + "\n"
    env = {**os.environ, "LLMFORGE_MLRUNS": str(models["mlruns"]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([LLMFORGE, "chat", str(models["sft"]), "--temperature", "0", "--max-new-tokens", "16",
                        "--system", "Be brief.", "--show-prompt", "--device", "cpu"],
                       input=script, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    notices = [line for line in p.stderr.splitlines() if line.startswith("[")]
    prompts = [ast.literal_eval(line.removeprefix("[prompt] ")) for line in notices if line.startswith("[prompt] ")]
    assert len(prompts) == len(questions)  # the line after /exit is never read
    system = "Be brief.\n\n"
    # the template, with the system message first
    assert prompts[0] == system + sft.format_prompt(questions[0])
    # the second turn sees the first: its prompt, the reply printed on stdout, EOS, the new prompt
    reply = prompts[1][len(prompts[0]):-len("</s>" + sft.format_prompt(questions[1]))]
    assert prompts[1] == prompts[0] + reply + "</s>" + sft.format_prompt(questions[1])
    assert p.stdout.startswith(reply + "\n")
    # /reset forgets it
    assert "[history cleared]" in notices
    assert prompts[2] == system + sft.format_prompt(questions[2])
    # the context (96 tokens, 16 kept for the reply) fills up: the oldest turns go, the system stays
    dropped = [i for i, line in enumerate(notices) if line.startswith("[dropped the")]
    assert dropped, p.stderr
    assert "oldest turn" in notices[dropped[0]] and "96-token context" in notices[dropped[0]]
    for q in prompts:
        assert q.startswith(system + "### Instruction:\n")
    last = prompts[-1]
    assert questions[2] not in last and last.endswith(sft.format_prompt(questions[-1]))
    assert sum(len(tok.encode(part)) for part in last.split("</s>")) + last.count("</s>") <= BLOCK - 16


def test_chat_without_a_template_continues_the_text_line_after_line(models, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat chased the\nthe dog fetched the\n"))
    rc = cli_main(["chat", str(models["base"]), "--temperature", "0", "--max-new-tokens", "6", "--show-prompt",
                   "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    prompts = [ast.literal_eval(line.removeprefix("[prompt] ")) for line in err.splitlines()
               if line.startswith("[prompt] ")]
    reply = prompts[1][len("the cat chased the"):-len("\nthe dog fetched the")]
    assert prompts == ["the cat chased the", "the cat chased the" + reply + "\nthe dog fetched the"]
    assert out.startswith(reply + "\n")
    # the first reply is what `llmforge generate` continues the same text with
    assert cli_main(["generate", str(models["base"]), "--prompt", "the cat chased the", "--max-new-tokens", "6",
                     "--temperature", "0", "--no-echo", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == reply + "\n"


def test_chat_refuses_options_it_cannot_honour_in_one_line(models, capsys, tmp_path):
    assert cli_main(["chat", str(models["base"]), "--system", "Be brief.", "--device", "cpu"]) == 2
    assert "--system needs a model with a chat template" in capsys.readouterr().err
    assert cli_main(["chat", str(models["sft"]), "--max-new-tokens", str(BLOCK), "--device", "cpu"]) == 2
    assert f"--max-new-tokens {BLOCK}: must be below the model's context of {BLOCK} tokens" in capsys.readouterr().err
    assert cli_main(["chat", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt: no such checkpoint file" in err and len(err.strip().splitlines()) == 1
