"""`llmforge serve` as its clients see it: the official `openai` client against a live server.

The server is the real command in a subprocess on 127.0.0.1 (a free port it picks and prints),
stopped by its PID with SIGINT (Ctrl-C). The reference texts come from `llmforge generate` on the
same checkpoint. The model has random weights with a sharpened head (as tests/test_generate.py
uses), a tokenizer of its own and the SFT chat template stored the way fine-tuning stores it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from llmforge.flows.cli import main as cli_main
from llmforge.model.checkpoint import save_checkpoint
from llmforge.model.gpt import GPT, GPTConfig
from llmforge.model.sft import CHAT_TEMPLATE, format_prompt
from test_generate import TEXT

torch.set_num_threads(1)
LLMFORGE = str(Path(sys.executable).parent / "llmforge")
KEY = "sk-test-0123456789"
NAME = "tiny-chat"


def make_checkpoint(path: Path, proto: bytes, *, block_size: int, template: str | None = CHAT_TEMPLATE,
                    **shape) -> Path:
    torch.manual_seed(0)
    # vocabulary padded past the tokenizer's 400 pieces (as real runs pad to a multiple of 64)
    model = GPT(GPTConfig(**{"vocab_size": 448, "block_size": block_size, "n_layer": 2, "n_head": 4, "n_embd": 64,
                             "tie_embeddings": False, **shape}))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # decisive greedy choices, not near-ties
    return save_checkpoint(path, model_state=model.state_dict(), optimizer_state=None, scheduler_state=None, step=7,
                           data_state={}, rng_state={}, config={"model": model.config.to_dict()}, lineage={},
                           tokenizer=proto, extra={"chat_template": template} if template else {})


@pytest.fixture(scope="module")
def proto() -> bytes:
    from llmforge.pipeline.tokenizer import TokenizerConfig, train_sentencepiece

    sample = [TEXT] * 40 + [format_prompt("What is the cat?") + "The cat is small.\n"] * 20
    return train_sentencepiece(sample, TokenizerConfig(vocab_size=400, character_coverage=0.98, threads=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, proto) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / f"{NAME}.pt", proto, block_size=128)


class Server:
    """`llmforge serve CHECKPOINT --port 0 ...` in a subprocess; its URL from the line it prints."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([LLMFORGE, "serve", str(checkpoint), "--port", "0", "--device", "cpu", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()  # blocks until the server is about to accept connections
        if not line.startswith("serving "):
            self.proc.kill()
            raise AssertionError(f"server did not start: {line}{self.proc.stdout.read()}{self.proc.stderr.read()}")
        self.first_line = line
        self.url = line.split(" at ", 1)[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.root = self.url.removesuffix("/v1")
        self.port = int(self.root.rsplit(":", 1)[1])

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.root}/health", timeout=10).json()

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a person stops it; (exit code, what it printed after the first line)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out + err


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "--api-key", KEY)
    yield s
    s.stop()


def generate_text(checkpoint: Path, prompt: str, n: int, capsys, *sampling: str) -> str:
    """What `llmforge generate --no-echo` prints for ``prompt`` (without its final newline)."""
    capsys.readouterr()
    rc = cli_main(["generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(n), "--no-echo",
                   "--device", "cpu", *sampling])
    out = capsys.readouterr().out
    assert rc == 0 and out.endswith("\n")
    return out[:-1]


# ---------------------------------------------------------------------------------------------


def test_models_and_health_describe_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].owned_by == "llmforge"
    h = server.health()
    assert h["status"] == "ok" and h["model"] == NAME and h["slots"] == 8 and h["decode"] == "batched"
    assert server.first_line.startswith(f"serving {NAME} at http://127.0.0.1:")


@pytest.mark.parametrize("prompt,sampling", [
    ("The quick brown", ["--temperature", "0"]),
    ("Café au lait, déjà", ["--temperature", "0"]),
    ("Tabs and", ["--temperature", "1", "--top-k", "50", "--seed", "11"]),
])
def test_completion_equals_llmforge_generate_on_the_same_prompt(server, checkpoint, capsys, prompt, sampling):
    opts = dict(zip([a.lstrip("-").replace("-", "_") for a in sampling[::2]], map(float, sampling[1::2])))
    extra = {"top_k": int(opts.pop("top_k"))} if "top_k" in opts else {}
    if "seed" in opts:
        opts["seed"] = int(opts["seed"])
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=30, extra_body=extra, **opts)
    expected = generate_text(checkpoint, prompt, 30, capsys, *sampling)
    assert r.choices[0].text == expected
    assert len(expected) > 5
    from llmforge.pipeline.tokenizer import Tokenizer
    from llmforge.model.checkpoint import load_checkpoint, tokenizer_bytes

    tok = Tokenizer(tokenizer_bytes(load_checkpoint(checkpoint)))
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == (30 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_completion_equals_generate_on_the_template_prompt(server, checkpoint, capsys):
    question = "What is the cat?"
    stream = server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["length"],
                                                                                                        ["stop"])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one piece
    # one user turn renders format_prompt byte for byte, so generate on that text is the reference
    assert text == generate_text(checkpoint, format_prompt(question), 40, capsys, "--temperature", "0")
    assert chunks[-1].usage.completion_tokens <= 40 and chunks[-1].usage.prompt_tokens > 5

    # on the wire: OpenAI's chunk objects as server-sent events, ending with [DONE]
    with httpx.stream("POST", f"{server.url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 5,
                            "temperature": 0, "stream": True}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["model"] == NAME and first["id"].startswith("chatcmpl-")
    non_stream = server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                         max_tokens=40, temperature=0)
    assert non_stream.choices[0].message.content == text


def test_eight_concurrent_clients_get_the_texts_of_sequential_calls(server):
    client = server.client()

    def ask(i: int) -> str:
        if i % 2:  # seeded sampling, streamed chat
            stream = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"Question {i}: what is the cat?"}], max_tokens=48,
                temperature=1.0, top_p=0.9, seed=100 + i, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.completions.create(model=NAME, prompt=f"The quick brown fox {i}", max_tokens=48,
                                         temperature=0).choices[0].text

    sequential = [ask(i) for i in range(8)]
    assert len(set(sequential)) == 8
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, range(8)))
    assert concurrent == sequential
    assert server.health()["active"] == 0


def test_stop_sequences_cut_the_text_streamed_or_not(server):
    client = server.client()
    full = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=40, temperature=0).choices[0].text
    stop = full[12:15]
    expected = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(server):
    client = server.client()
    user = [{"role": "user", "content": "What is the cat?"}]
    bad = [
        (dict(prompt="The", max_tokens=128), "maximum context length is 128 tokens.*129 tokens"),
        (dict(prompt="The", max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (dict(prompt="The", temperature=2.5), "temperature: Input should be less than or equal to 2"),
        (dict(prompt="The", top_p=0), "top_p: Input should be greater than 0"),
        (dict(prompt="The", model="gpt-4o"), "The model 'gpt-4o' does not exist; this server has 'tiny-chat'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.completions.create(**{"model": NAME, **kwargs})
        assert e.value.status_code == 400 and e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        client.chat.completions.create(model=NAME, messages=user + user, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="your messages resulted in"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "cat " * 200}])
    r = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_a_wrong_or_missing_api_key_gets_401(server):
    for key in ("sk-wrong-key-123456", None):
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(key).completions.create(model=NAME, prompt="The", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/completions", json={"model": NAME, "prompt": "The"}, timeout=10)
    assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/completions", json={"temperature": 9}, timeout=10)  # the key is checked first
    assert r.status_code == 401
    assert httpx.get(f"{server.root}/health", timeout=10).status_code == 200  # health needs no key


def test_a_client_leaving_mid_stream_frees_its_slot_and_ctrl_c_stops_the_server(tmp_path, proto):
    long_ckpt = make_checkpoint(tmp_path / "long.pt", proto, block_size=8192)
    server = Server(long_ckpt, "--slots", "1")  # one slot: a request waits while another holds it
    try:
        body = {"model": "long", "prompt": "The", "max_tokens": 8000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(10)]  # a few tokens in, then the client goes away
        assert all(g.startswith("data: ") or not g for g in got)
        t0 = time.perf_counter()
        while (h := server.health())["active"] and time.perf_counter() - t0 < 10:
            time.sleep(0.05)
        assert h["active"] == 0 and h["cancelled"] == 1
        stopped_at = h["generated_tokens"]
        assert stopped_at < 2000, h  # the 8000-token generation was cut short
        r = server.client().completions.create(model="long", prompt="The quick", max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason == "length"
        assert time.perf_counter() - t0 < 15
        assert server.health()["generated_tokens"] == stopped_at + 8
    finally:
        code, output = server.stop()
    assert code == 0 and "server stopped" in output, output
    with socket.socket() as s:  # the port is free again: a new server can listen on it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
        s.listen()


@pytest.mark.parametrize("shape", [{}, {"bias": True}, {"mlp": "swiglu", "n_kv_head": 2, "qk_norm": True},
                                   {"ngram_buckets": 61, "ngram_order": 3, "value_embeds": 1}],
                         ids=["gpt", "bias", "llama-gqa-qknorm", "ngram-value-embeds"])
def test_a_batched_step_gives_each_sequence_exactly_its_logits_alone(proto, shape):
    """The engine's batched step: whatever shares the batch, in whatever order, a sequence's
    logits are bit for bit those of GPT.forward on it alone (so served text is generate()'s),
    for every model shape GPT has."""
    from llmforge.model.generate import forward_rows

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=4, n_embd=64, **shape)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 448, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 63)]

    def prefilled(ids: list[int]):
        cache = model.make_kv_cache(1)
        if len(ids) > 1:
            model(torch.tensor([ids[:-1]]), kv_cache=cache)
        return cache

    with torch.no_grad():
        alone = [model(torch.tensor([[p[-1]]]), kv_cache=prefilled(p))[0][0, -1] for p in prompts]
    for order in ([0, 1, 2, 3, 4], [3, 0], [4, 2, 1, 3, 0], [2]):
        logits = forward_rows(model, [prompts[i][-1] for i in order], [prefilled(prompts[i]) for i in order])
        for row, i in enumerate(order):
            assert torch.equal(logits[row], alone[i]), (order, i)


def test_serve_refuses_a_port_in_use_or_a_bad_model_in_one_line(tmp_path, checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", str(checkpoint), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["serve", str(tmp_path / "missing.pt"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "missing.pt: no such checkpoint file" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["serve", str(checkpoint), "--slots", "0"]) == 2
    assert "--slots 0: must be between 1 and 256" in capsys.readouterr().err


def test_chat_endpoint_needs_a_model_with_a_chat_template(tmp_path, proto):
    plain = make_checkpoint(tmp_path / "plain.pt", proto, block_size=64, template=None)
    server = Server(plain)
    try:
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            server.client().chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert server.client().completions.create(model="plain", prompt="The", max_tokens=3).usage.completion_tokens
    finally:
        server.stop()


def test_an_hf_export_directory_is_served_and_chats_like_llmforge_generate_on_it(tmp_path, proto, capsys):
    from llmforge.model.export import ExportConfig, ExportStage

    ckpt = make_checkpoint(tmp_path / "llama.pt", proto, block_size=128, mlp="swiglu", n_kv_head=2)
    out = tmp_path / "llama-hf"
    ExportStage(ckpt, ExportConfig(format="hf"), out=out).run()  # carries the chat template
    server = Server(out)
    try:
        question = "What is the cat?"
        r = server.client().chat.completions.create(model="llama-hf", messages=[{"role": "user", "content": question}],
                                                    max_tokens=30, temperature=0)
        expected = generate_text(out, format_prompt(question), 30, capsys, "--temperature", "0")
        assert r.choices[0].message.content == expected and len(expected) > 5
        assert expected == generate_text(ckpt, format_prompt(question), 30, capsys, "--temperature", "0")
    finally:
        server.stop()
