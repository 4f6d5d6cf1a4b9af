"""An OpenAI-compatible HTTP server for one model: the decoding engine and the FastAPI app.

**Engine.** One worker thread owns the model. Requests wait in a FIFO queue for one of ``slots``
places; a request in a slot is prefilled alone (its prompt through ``GPT.forward`` into its own
KV cache, as :func:`model.generate.generate` does), then decoded one token per step until EOS, a
stop string, ``max_tokens`` or its client leaving. Two ways to run a step:

- ``batched`` (default): one pass for every busy slot (:func:`model.generate.forward_rows`): the
  projections of all requests as one batched one-row-per-request product, attention per request.
  Each request's logits are bit for bit those of ``GPT.forward`` on it alone, so its text is
  ``llmforge generate``'s, whatever else is running.
- ``sequential``: one ``GPT.forward`` per busy slot per step, in turn: the baseline.

``bench/serve_throughput.py`` measures both (batched is several times faster with 8 streams on a
CPU: a small model's step is mostly per-operation overhead, which the batch shares).

**HTTP** (:func:`create_app`): ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` gives server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``). Errors are OpenAI's JSON (``{"error": {"message", "type", "param",
"code"}}``): 400 for a request that cannot be served (context overflow, ``max_tokens``, sampling
values, an unknown model, roles out of order), 401 for a missing or wrong API key. A client that
disconnects frees its slot: its generation stops at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmforge.model.generate import StopText, forward_rows, sample_next

DECODE_MODES = ("batched", "sequential")


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class Job:
    """One sequence to generate. ``emit`` is called on the engine thread with ``("text", str)``
    events and then one ``("end", finish_reason, completion_tokens)``, or ``("error", message)``;
    nothing more once the job was cancelled."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    cancelled: bool = False
    # decoding state, kept by the engine
    done: bool = False
    produced: int = 0
    last: int = 0
    cache: Any = None
    text: StopText | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (the client left); safe from any thread, a no-op once it ended."""
        self.cancelled = True


class Engine:
    """The worker thread that decodes every request (see the module docstring)."""

    def __init__(self, model: Any, tok: Any, *, slots: int = 8, decode: str = "batched") -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.model, self.tok = model.eval(), tok
        self.slots, self.decode = slots, decode
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.vocab_limit = tok.vocab_size if tok.vocab_size < model.config.vocab_size else None
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "generated_tokens": 0, "cancelled": 0}

    # -- the caller's side
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="llmforge-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        if not job.prompt or len(job.prompt) + job.max_tokens > self.block_size:
            raise ValueError(f"prompt ({len(job.prompt)}) + max_tokens ({job.max_tokens}) must fit in "
                             f"{self.block_size} tokens")
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(job)
            self._cv.notify()
        return job

    def close(self, timeout: float = 10) -> None:
        """Cancel what is queued or running and stop the thread."""
        with self._cv:
            self._closed = True
            for job in [*self._pending, *self._active]:
                job.cancel()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"slots": self.slots, "active": len(self._active), "waiting": len(self._pending), **self.stats}

    # -- the worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._active:
                    self._cv.wait()
                if self._closed:
                    return
                admitted = []
                while len(self._active) + len(admitted) < self.slots and self._pending:
                    admitted.append(self._pending.popleft())
                self._active += admitted
            try:
                for job in admitted:
                    self._prefill(job)
                if live := [job for job in self._active if not job.done]:
                    self._step(live)
            except Exception as e:  # a bug: fail the requests in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                for job in self._active:
                    if not job.done and not job.cancelled:
                        job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    job.done = True
            with self._cv:
                self._active = [job for job in self._active if not job.done]

    def _prefill(self, job: Job) -> None:
        if job.cancelled:
            return self._end(job, None)
        self.stats["requests"] += 1
        job.text = StopText(self.tok.decode, job.stops)
        if job.seed is not None or job.temperature > 0:
            job.generator = torch.Generator(device=self.device)
            if job.seed is not None:
                job.generator.manual_seed(job.seed)
            else:
                job.generator.seed()
        job.cache = self.model.make_kv_cache(1)
        logits, _ = self.model(torch.tensor([job.prompt], dtype=torch.long, device=self.device), kv_cache=job.cache)
        self._take(job, logits[:, -1, :])

    def _step(self, jobs: list[Job]) -> None:
        if self.decode == "sequential":  # one forward pass per request, as generate() does
            for job in jobs:
                logits, _ = self.model(torch.tensor([[job.last]], device=self.device), kv_cache=job.cache)
                self._take(job, logits[:, -1, :])
            return
        logits = forward_rows(self.model, [job.last for job in jobs], [job.cache for job in jobs])
        for i, job in enumerate(jobs):
            self._take(job, logits[i:i + 1])

    def _take(self, job: Job, last: torch.Tensor) -> None:
        """Sample the next token from ``last`` ([1, V]) and pass on what it adds to the text."""
        if job.cancelled:
            return self._end(job, None)
        if self.vocab_limit is not None:
            last = last.clone()
            last[:, self.vocab_limit:] = float("-inf")
        token = int(sample_next(last, temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                                generator=job.generator)[0, 0])
        if token == self.tok.eos_id:
            return self._end(job, "stop")
        job.produced += 1
        self.stats["generated_tokens"] += 1
        job.last = token
        if delta := job.text.push(token):
            job.emit(("text", delta))
        if job.text.stopped:
            self._end(job, "stop")
        elif job.produced >= job.max_tokens:
            self._end(job, "length")

    def _end(self, job: Job, reason: str | None) -> None:
        """Finish ``job`` and free its slot (``reason`` None: its client left; nothing is sent)."""
        job.done, job.cache = True, None
        if reason is None:
            self.stats["cancelled"] += 1
            return
        if tail := job.text.flush():
            job.emit(("text", tail))
        job.emit(("end", reason, job.produced))


# ---------------------------------------------------------------------------------------------
# the OpenAI request bodies

class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share; other OpenAI fields are accepted and ignored, except those
    :data:`UNSUPPORTED` names, which would change the answer."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's, but vLLM and llama.cpp take it too
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# OpenAI fields that would change the answer: refused with a 400 when set, never silently ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias", "presence_penalty",
               "frequency_penalty")


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise APIError(400, "only text content parts are supported", param="messages", code="unsupported_content")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _validation_error(errors: list[dict]) -> APIError:
    """A request body that does not validate, as one line naming the field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        at = first["loc"][-1] if first["loc"] else "?"
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'error')} at "
                             f"character {at})", code="invalid_json")
    loc = ".".join(str(p) for p in first["loc"] if p != "body")
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or first["type"] == "missing" else f" (got {got!r})"
    return APIError(400, f"{loc}: {msg}{shown}" if loc else msg, param=loc or None, code="invalid_value")


# ---------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine, *, name: str, chat_template: str | None, api_key: str | None = None,
               created: int | None = None):
    """The FastAPI app serving ``engine``'s model as ``name``."""
    from llmforge.model.chat import ChatError, encode_chat

    app = FastAPI(title="llmforge", docs_url=None, redoc_url=None, openapi_url=None)
    tok, block = engine.tok, engine.block_size
    created = created or int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(_validation_error(list(e.errors())).body(), status_code=400)

    def authorize(request: Request) -> None:
        """A dependency of every /v1 route: runs before the body is read, so a caller without the
        key learns that first (401), whatever else is wrong with the request."""
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            shown = f"{token[:3]}...{token[-4:]}" if len(token) > 8 else ("none" if not token else "***")
            raise APIError(401, f"Incorrect API key provided: {shown}. Give the key the server was started with "
                                f"(--api-key) as 'Authorization: Bearer KEY'.", code="invalid_api_key")

    def check(req: _Sampling) -> None:
        if req.model != name:
            raise APIError(400, f"The model '{req.model}' does not exist; this server has '{name}'", param="model",
                           code="model_not_found")
        given = req.model_extra or {}
        for key in UNSUPPORTED:
            if given.get(key) not in (None, False, 0, 0.0, [], {}):
                raise APIError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
        if req.top_k is not None and req.top_k > tok.vocab_size:
            raise APIError(400, f"top_k: {req.top_k} is more than the vocabulary's {tok.vocab_size}", param="top_k",
                           code="invalid_value")

    def fit(prompt: list[int], max_tokens: int | None, default_rest: bool) -> int:
        """max_tokens checked against the context (``None``: all the room left, for chat)."""
        if max_tokens is None and default_rest:
            max_tokens = block - len(prompt)
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {block} tokens. However, your messages "
                                    f"resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                               param="messages", code="context_length_exceeded")
        assert max_tokens is not None
        if len(prompt) + max_tokens > block:
            raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def run_jobs(req: _Sampling, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[Job], asyncio.Queue]:
        """Submit one job per (prompt, n); returns (jobs, queue of (index, event))."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs = []
        temperature = 1.0 if req.temperature is None else req.temperature
        for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
            for j in range(req.n):
                index = i * req.n + j

                def emit(ev: tuple, index: int = index) -> None:
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
                    except RuntimeError:  # the server is shutting down: nobody is listening
                        pass

                jobs.append(Job(prompt=ids, max_tokens=mt, emit=emit, temperature=temperature, top_k=req.top_k,
                                top_p=req.top_p, seed=None if req.seed is None else req.seed + j,
                                stops=req.stops()))
        for job in jobs:
            engine.submit(job)
        return jobs, queue

    async def collect(request: Request, jobs: list[Job], queue: asyncio.Queue) -> list[dict] | None:
        """Wait for every job; ``None`` if the client left (the jobs are cancelled)."""
        results = [{"text": "", "finish_reason": None, "tokens": 0} for _ in jobs]
        left = len(jobs)
        try:
            while left:
                try:
                    index, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if ev[0] == "text":
                    results[index]["text"] += ev[1]
                elif ev[0] == "end":
                    results[index].update(finish_reason=ev[1], tokens=ev[2])
                    left -= 1
                else:
                    raise APIError(500, ev[1], type="server_error", code="generation_failed")
        finally:
            for job in jobs:
                job.cancel()
        return results

    def usage(prompts: list[list[int]], n: int, results_tokens: list[int]) -> dict[str, int]:
        p = sum(len(x) for x in prompts) * n
        c = sum(results_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def stream(jobs: list[Job], queue: asyncio.Queue, chunk: Callable[[int, tuple | None], dict],
               prompts: list[list[int]], n: int, include_usage: bool, base: dict) -> JobStream:
        async def events():
            left, tokens = len(jobs), [0] * len(jobs)
            for i in range(len(jobs)):
                if (first := chunk(i, None)) is not None:
                    yield _sse({**base, **first, **({"usage": None} if include_usage else {})})
            while left:
                index, ev = await queue.get()
                if ev[0] == "error":
                    yield _sse({"error": APIError(500, ev[1], type="server_error").body()["error"]})
                    break
                if ev[0] == "end":
                    left -= 1
                    tokens[index] = ev[2]
                yield _sse({**base, **chunk(index, ev), **({"usage": None} if include_usage else {})})
            else:
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": usage(prompts, n, tokens)})
                yield "data: [DONE]\n\n"

        return JobStream(events(), jobs, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "decode": engine.decode, **engine.load()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [_model_card(name, created)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card(name, created)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        check(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt", code="invalid_value")
        # as `llmforge generate`: the prompt's tokens, or an EOS (start of a document) when empty
        prompts = [tok.encode(t) if t else [tok.eos_id] for t in texts]
        max_tokens = [fit(p, req.max_tokens, default_rest=False) for p in prompts]
        jobs, queue = run_jobs(req, prompts, max_tokens)
        base = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if req.stream:
            def chunk(index: int, ev: tuple | None) -> dict | None:
                if ev is None:
                    return None
                text, reason = (ev[1], None) if ev[0] == "text" else ("", ev[1])
                return {"choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

            return stream(jobs, queue, chunk, prompts, req.n, bool(req.stream_options and
                                                                  req.stream_options.include_usage), base)
        results = await collect(request, jobs, queue)
        if results is None:
            return JSONResponse({}, status_code=499)
        return {**base, "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                                    for i, r in enumerate(results)],
                "usage": usage(prompts, req.n, [r["tokens"] for r in results])}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest, request: Request):
        check(req)
        if chat_template is None:
            raise APIError(400, f"'{name}' has no chat template (it was not instruction-tuned); use /v1/completions",
                           param="messages", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = encode_chat(tok, chat_template, messages)
        except ChatError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        max_tokens = fit(prompt, req.max_completion_tokens or req.max_tokens, default_rest=True)
        jobs, queue = run_jobs(req, [prompt], [max_tokens])
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        if req.stream:
            base["object"] = "chat.completion.chunk"

            def chunk(index: int, ev: tuple | None) -> dict:
                if ev is None:
                    delta, reason = {"role": "assistant", "content": ""}, None
                elif ev[0] == "text":
                    delta, reason = {"content": ev[1]}, None
                else:
                    delta, reason = {}, ev[1]
                return {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            return stream(jobs, queue, chunk, [prompt], req.n, bool(req.stream_options and
                                                                   req.stream_options.include_usage), base)
        results = await collect(request, jobs, queue)
        if results is None:
            return JSONResponse({}, status_code=499)
        return {**base, "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                                     "logprobs": None, "finish_reason": r["finish_reason"]}
                                    for i, r in enumerate(results)],
                "usage": usage([prompt], req.n, [r["tokens"] for r in results])}

    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmforge"}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class JobStream(StreamingResponse):
    """A stream whose jobs are cancelled however it ends: finished, or the client gone (the write
    fails, or the disconnect is seen), so a slot is never held for nobody."""

    def __init__(self, content: Any, jobs: list[Job], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()
            await self.body_iterator.aclose()
