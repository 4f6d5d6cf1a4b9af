"""Serve a model over HTTP with OpenAI's API, for any OpenAI client, on 127.0.0.1 unless --host.

  llmforge serve runs/finetune-lora-XXXX/model.pt               # http://127.0.0.1:8000/v1
  llmforge serve models:/my-gpt/2 --port 8080 --api-key sk-local

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
  client.chat.completions.create(model="finetune-lora-XXXX", stream=True,
                                 messages=[{"role": "user", "content": "What is json for?"}])

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream:
true gives server-sent events). The model is called by its run directory's name (or the registered
name), see /v1/models; --name changes it. Chat needs a model with a chat template (a fine-tune).
Up to --slots requests are decoded at once (more wait their turn); --decode batched runs them
through one forward pass per token, sequential one after another.

The model and the port are checked before the server starts; Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os

HELP = "serve a model over HTTP with the OpenAI API (completions, chat, streaming)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint (a fine-tune's model.pt, best.pt), a run directory, an "
                   "`llmforge export --format hf` directory, or models:/NAME/VERSION")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("LLMFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLMFORGE_API_KEY; none: no key needed)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: its run directory's "
                   "or registered name)")
    p.add_argument("--slots", type=int, default=8, metavar="N", help="requests decoded at once (default: 8)")
    p.add_argument("--decode", choices=["batched", "sequential"], default="batched",
                   help="batched: one forward pass per token for all slots (default); sequential: one per request")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu or cuda[:N]")


def run(args: argparse.Namespace) -> int:
    from llmforge.console import say, warn
    from llmforge.errors import ConfigError
    from llmforge.model.generate import load_model
    from llmforge.model.runtime import check_device
    from llmforge.model.serve import Engine, create_app

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be between 0 and 65535")
    if not 1 <= args.slots <= 256:
        raise ConfigError(f"--slots {args.slots}: must be between 1 and 256")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key: empty; give a key, or leave the option out to serve without one")
    check_device(args.device)
    sock = _bind(args.host, args.port)  # the port is ours from here: no race with another server
    try:
        model, tok, meta = load_model(args.model, args.device)
        name = args.name or meta["name"]
        engine = Engine(model, tok, slots=args.slots, decode=args.decode).start()
        app = create_app(engine, name=name, chat_template=meta.get("chat_template"), api_key=args.api_key)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            warn(f"listening on {args.host} without --api-key: anyone who can reach this machine can use the model")
        sock.listen(128)  # from here connections wait in the backlog until uvicorn accepts them
        device = next(model.parameters()).device
        say(f"serving {name} at http://{shown}:{port}/v1 ({model.num_params() / 1e6:.1f}M params on {device}, "
            f"context {model.config.block_size}, {'chat template' if meta.get('chat_template') else 'no chat template'}, "
            f"{args.slots} slots, {args.decode} decoding); Ctrl-C stops")

        _serve(app, sock)
        engine.close()
        say("server stopped")
    finally:
        sock.close()
    return 0


def _bind(host: str, port: int):
    """A socket bound to ``host:port``, or a one-line error naming the option."""
    import errno
    import socket

    from llmforge.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop can rebind
    try:
        sock.bind(addr)  # listened on once the model is loaded: no client waits on a server that may fail
    except OSError as e:
        sock.close()
        what = ("is in use (another server?); pick another with --port" if e.errno == errno.EADDRINUSE
                else f"({e.strerror})")
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port}: {what}") from None
    return sock


def _serve(app, sock) -> None:
    """Run uvicorn on ``sock`` until Ctrl-C or SIGTERM. uvicorn raises the signal again once it has
    stopped; here it is not, so the command finishes its own clean-up and exits 0."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    Server(config).run(sockets=[sock])
