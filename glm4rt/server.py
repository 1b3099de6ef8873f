"""``glm4rt serve``: an OpenAI-compatible HTTP server over ``Glm4Engine`` (Starlette + uvicorn, the
``server`` extra).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``POST /tokenize``, ``POST /detokenize``, ``GET /metrics`` (Prometheus text). Errors are OpenAI
error objects (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status; the server
keeps serving after any of them. Streams are server-sent events ending in ``data: [DONE]``; a
client that disconnects cancels its request at once (its slot is free for the next step).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import (EngineClosedError, EngineError, EngineParams, ErrorEvent, FinishEvent, Glm4Engine,
                     QueueFullError, TokenEvent)
from .errors import Glm4rtError
from .openai_format import (ReasoningSplitter, RequestError, check_tools, may_be_tool_call,
                            parse_tool_calls, template_messages)
from .sampling import SamplingParams

MAX_BODY_BYTES = 4 * 2**20  # request bodies larger than this get 413


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ---- request fields ---------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, what: str = "") -> Any:
    """``body[name]`` if present and of one of ``kinds`` (bool is not a number), else RequestError."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok or (check is not None and not check(value)):
        raise RequestError(f"{name} must be {what}, got {value!r}", name)
    return value


def sampling_fields(body: dict, ctx_room: Optional[int] = None) -> tuple[EngineParams, int]:
    """The engine parameters of a chat or completions request, and ``n``."""
    num = (int, float)
    max_tokens = _field(body, "max_completion_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    temperature = _field(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _field(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), 0, lambda v: v >= -1, "an integer >= 0 (0 or -1: off)")
    min_p = _field(body, "min_p", num, None, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    repetition_penalty = _field(body, "repetition_penalty", num, 1.0, lambda v: v > 0, "a number > 0")
    presence = _field(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    frequency = _field(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    seed = _field(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer >= 0")
    n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of up to 16 of them", "stop")
    do_sample = temperature > 0
    sampling = SamplingParams(do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                              top_k=max(top_k, 0), top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty)
    ignore_eos = _field(body, "ignore_eos", (bool,), False, what="true or false")
    cache_prompt = _field(body, "cache_prompt", (bool,), True, what="true or false")
    params = EngineParams(max_tokens=max_tokens, sampling=sampling, seed=seed, stop=tuple(stop),
                          presence_penalty=float(presence), frequency_penalty=float(frequency),
                          ignore_eos=ignore_eos, cache_prompt=cache_prompt)
    return params, n


class _Metrics:
    def __init__(self) -> None:
        self.requests = {}  # (route, status) -> count

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1


class OpenAIServer:
    """The routes over one engine.

    Args:
        engine: the ``Glm4Engine`` (owns the model).
        tokenizer: the checkpoint's ``Glm4Tokenizer``.
        model_name: the id ``/v1/models`` lists and responses carry.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
    """

    def __init__(self, engine: Glm4Engine, tokenizer, model_name: str, api_key: Optional[str] = None,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.metrics = _Metrics()
        self.created = int(time.time())
        template = getattr(tokenizer, "chat_template", None) or ""
        self.reasoning_model = "</think>" in (template if isinstance(template, str) else json.dumps(template))
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._wrap(self.chat, "chat"), methods=["POST"]),
            Route("/v1/completions", self._wrap(self.completions, "completions"), methods=["POST"]),
            Route("/v1/models", self._wrap(self.models, "models"), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/tokenize", self._wrap(self.tokenize, "tokenize"), methods=["POST"]),
            Route("/detokenize", self._wrap(self.detokenize, "detokenize"), methods=["POST"]),
            Route("/metrics", self._wrap(self.prometheus, "metrics"), methods=["GET"]),
        ])

    # ---- plumbing ------------------------------------------------------------------------------

    def _wrap(self, handler, route: str):
        async def endpoint(request: Request) -> Response:
            if self.api_key is not None:
                auth = request.headers.get("authorization", "")
                if auth != f"Bearer {self.api_key}":
                    self.metrics.count(route, 401)
                    return error_response(401, "missing or wrong API key (Authorization: Bearer ...)",
                                          "authentication_error", code="invalid_api_key")
            try:
                response = await handler(request)
            except RequestError as e:
                response = error_response(400, str(e), param=e.param, code=e.code)
            except QueueFullError as e:
                response = error_response(429, str(e), "rate_limit_error", code="server_busy")
                response.headers["Retry-After"] = "1"
            except EngineClosedError as e:
                response = error_response(503, str(e), "server_error", code="shutting_down")
            except (EngineError, Glm4rtError, ValueError) as e:
                response = error_response(400, str(e))
            except _BodyError as e:
                response = error_response(e.status, str(e))
            except _ServerError as e:
                response = error_response(503, str(e), "server_error")
            self.metrics.count(route, response.status_code)
            return response
        return endpoint

    async def _json(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise _BodyError(413, f"the request body exceeds {self.max_body_bytes} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body_bytes:
                raise _BodyError(413, f"the request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("model must be a string", "model")

    def _submit(self, prompt: list[int], params: EngineParams, n: int, loop) -> list:
        """Submit ``n`` choices (choice i seeded ``seed + i``); each gets an asyncio queue."""
        queues, handles = [], []
        try:
            for i in range(n):
                p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
                q: asyncio.Queue = asyncio.Queue()
                handles.append(self.engine.submit(prompt, p, listener=_listener(loop, q)))
                queues.append(q)
        except Exception:
            for h in handles:
                h.cancel()
            raise
        return list(zip(handles, queues))

    # ---- routes --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "glm4rt",
             "max_model_len": self.engine.ctx}]})

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        if "messages" in body:
            ids = self._chat_prompt(body)[0]
        else:
            text = body.get("prompt", body.get("text"))
            if not isinstance(text, str):
                raise RequestError("give prompt (a string) or messages", "prompt")
            add = _field(body, "add_special_tokens", (bool,), False, what="true or false")
            ids = self.tokenizer.encode(text, add_special_tokens=add)
        return JSONResponse({"tokens": [int(t) for t in ids], "count": len(ids), "max_model_len": self.engine.ctx})

    async def detokenize(self, request: Request) -> Response:
        body = await self._json(request)
        ids = body.get("tokens")
        vocab = self.engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise RequestError(f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(self.tokenizer.known_ids(ids))})

    async def prometheus(self, request: Request) -> Response:
        s = self.engine.stats
        lines = ["# TYPE glm4rt_requests_total counter"]
        for (route, status), count in sorted(self.metrics.requests.items()):
            lines.append(f'glm4rt_requests_total{{route="{route}",status="{status}"}} {count}')
        rate = s["completion_tokens"] / s["busy_seconds"] if s["busy_seconds"] else 0.0
        lines += [
            "# TYPE glm4rt_prompt_tokens_total counter", f"glm4rt_prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE glm4rt_cached_prompt_tokens_total counter", f"glm4rt_cached_prompt_tokens_total {s['cached_tokens']}",
            "# TYPE glm4rt_generation_tokens_total counter", f"glm4rt_generation_tokens_total {s['completion_tokens']}",
            "# TYPE glm4rt_engine_steps_total counter", f"glm4rt_engine_steps_total {s['steps']}",
            "# TYPE glm4rt_queue_length gauge", f"glm4rt_queue_length {self.engine.queue_length}",
            "# TYPE glm4rt_running_requests gauge", f"glm4rt_running_requests {self.engine.running}",
            "# TYPE glm4rt_generation_tokens_per_second gauge", f"glm4rt_generation_tokens_per_second {rate:.3f}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def _chat_prompt(self, body: dict) -> tuple[list[int], list, bool]:
        """The prompt ids of a chat request, its tools, and whether the reply starts thinking."""
        messages = template_messages(body.get("messages"))
        tools = check_tools(body.get("tools"))
        choice = body.get("tool_choice", "auto")
        if choice == "none":
            tools = []
        elif choice not in ("auto", "required") and not isinstance(choice, dict):
            raise RequestError("tool_choice must be none, auto, required or a function", "tool_choice")
        if not tools and all(m["role"] in ("system",) for m in messages):
            raise RequestError("messages needs a user message", "messages")
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                  tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids, tools, self.reasoning_model and text.rstrip().endswith("<think>")

    async def chat(self, request: Request) -> Response:
        body = await self._json(request)
        self._check_model(body)
        params, n = sampling_fields(body)
        logprobs = _field(body, "logprobs", (bool,), False, what="true or false")
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
        params = dataclasses.replace(params, logprobs=logprobs, top_logprobs=top if logprobs else 0)
        prompt, tools, thinking = self._chat_prompt(body)
        stream = _field(body, "stream", (bool,), False, what="true or false")
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        loop = asyncio.get_running_loop()
        choices = self._submit(prompt, params, n, loop)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        tool_names = {t["function"]["name"] for t in tools}
        if stream:
            return _sse(self._chat_stream(choices, rid, created, tool_names, thinking, usage_in_stream), choices)
        results = [await _collect(q) for _, q in choices]
        out, usage = [], _usage(results)
        for i, (events, finish) in enumerate(results):
            text = "".join(e.text for e in events) + finish.text
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.reasoning_model:
                splitter = ReasoningSplitter(thinking)
                reasoning, answer = splitter.feed(text, final=True)
                message["reasoning_content"], message["content"] = reasoning or None, answer
            reason = finish.reason
            calls = parse_tool_calls(message["content"], tool_names) if tool_names else None
            if calls:
                message["content"], message["tool_calls"], reason = None, calls, "tool_calls"
            choice = {"index": i, "message": message, "finish_reason": reason, "logprobs": None}
            if logprobs:
                choice["logprobs"] = {"content": [self._chat_logprob(e) for e in events]}
            out.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                             "choices": out, "usage": usage})

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode(self.tokenizer.known_ids([token_id]))
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _chat_logprob(self, e: TokenEvent) -> dict:
        entry = self._token_entry(e.token_id, e.logprob)
        entry["top_logprobs"] = [self._token_entry(t, lp) for t, lp in (e.top_logprobs or [])]
        return entry

    async def _chat_stream(self, choices, rid, created, tool_names, thinking, include_usage):
        def chunk(i, delta, finish=None, logprobs=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

        finishes = []
        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        for i, (_, q) in enumerate(choices):  # choices run concurrently; sent one after another
            splitter = ReasoningSplitter(thinking) if self.reasoning_model else None
            held, tool_mode = "", bool(tool_names)
            while True:
                event = await q.get()
                if isinstance(event, ErrorEvent):
                    yield {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                    return
                last = isinstance(event, FinishEvent)
                text = event.text
                reasoning, content = splitter.feed(text, final=last) if splitter else ("", text)
                if reasoning:
                    yield chunk(i, {"reasoning_content": reasoning})
                if tool_mode:  # held back while the reply may still be a tool call
                    held, content = held + content, ""
                    if not may_be_tool_call(held, tool_names):
                        tool_mode, content, held = False, held, ""
                lp = None
                if isinstance(event, TokenEvent) and event.logprob is not None:
                    lp = {"content": [self._chat_logprob(event)]}
                if content or lp or (not last and not reasoning):  # a chunk per token, even ""
                    yield chunk(i, {"content": content}, logprobs=lp)
                if last:
                    reason = event.reason
                    calls = parse_tool_calls(held, tool_names) if held else None
                    if calls:
                        yield chunk(i, {"tool_calls": [dict(c, index=k) for k, c in enumerate(calls)]})
                        reason = "tool_calls"
                    elif held:
                        yield chunk(i, {"content": held})
                    finishes.append(event)
                    yield chunk(i, {}, reason)
                    break
        if include_usage:
            yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "choices": [], "usage": _usage([([], f) for f in finishes])}

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        self._check_model(body)
        params, n = sampling_fields(body)
        if params.max_tokens is None:  # OpenAI's default for completions
            params = dataclasses.replace(params, max_tokens=min(16, self.engine.ctx - 1))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise RequestError("prompt must be a non-empty string or list of token ids (one prompt per request)",
                               "prompt")
        if _field(body, "echo", (bool,), False, what="true or false"):
            raise RequestError("echo is not supported", "echo")
        top = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
        if top is not None:
            params = dataclasses.replace(params, logprobs=True, top_logprobs=top)
        stream = _field(body, "stream", (bool,), False, what="true or false")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        choices = self._submit(ids, params, n, asyncio.get_running_loop())
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def logprob_block(events):
            if top is None:
                return None
            return {"tokens": [self._token_entry(e.token_id, 0)["token"] for e in events],
                    "token_logprobs": [e.logprob for e in events],
                    "top_logprobs": [{self._token_entry(t, 0)["token"]: lp for t, lp in (e.top_logprobs or [])}
                                     for e in events]}

        if stream:
            async def events():
                finishes = []
                for i, (_, q) in enumerate(choices):
                    while True:
                        event = await q.get()
                        if isinstance(event, ErrorEvent):
                            yield {"error": {"message": event.message, "type": "server_error", "param": None,
                                             "code": None}}
                            return
                        if isinstance(event, TokenEvent):  # a chunk per token ("" while a character is incomplete)
                            yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                   "choices": [{"index": i, "text": event.text, "finish_reason": None,
                                                "logprobs": logprob_block([event])}]}
                        else:
                            finishes.append(event)
                            yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                                   "choices": [{"index": i, "text": event.text, "finish_reason": event.reason,
                                                "logprobs": None}]}
                            break
                if include_usage:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                           "choices": [], "usage": _usage([([], f) for f in finishes])}
            return _sse(events(), choices)
        results = [await _collect(q) for _, q in choices]
        out = [{"index": i, "text": "".join(e.text for e in events) + finish.text, "finish_reason": finish.reason,
                "logprobs": logprob_block(events)} for i, (events, finish) in enumerate(results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                             "choices": out, "usage": _usage(results)})


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _listener(loop, q: asyncio.Queue):
    """Hands the engine thread's events to the request's asyncio queue."""
    def put(event) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server stopped)
            pass
    return put


async def _collect(q: asyncio.Queue) -> tuple[list[TokenEvent], FinishEvent]:
    events = []
    while True:
        event = await q.get()
        if isinstance(event, ErrorEvent):
            raise _ServerError(event.message)
        if isinstance(event, FinishEvent):
            return events, event
        events.append(event)


class _ServerError(Exception):
    pass


def _usage(results) -> dict:
    prompt = results[0][1].prompt_tokens if results else 0
    completion = sum(f.completion_tokens for _, f in results)
    cached = results[0][1].cached_tokens if results else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(chunks, choices) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``. When the client goes
    away, Starlette cancels the generator; every request of ``choices`` is then cancelled, so its
    slot is free for the next step."""
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()
            for handle, _ in choices:
                handle.cancel()
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def run_server(engine: Glm4Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               api_key: Optional[str] = None, ready=None) -> None:
    """Serve until Ctrl-C / SIGTERM. On the signal the engine stops first, so every open stream
    ends with an error event and uvicorn's graceful shutdown has no request left to wait for.

    Args:
        ready: called with the base URL once the socket listens (default: print it).
    """
    import sys

    import uvicorn

    # The engine thread takes the GIL back after each kernel (about 100 times per step), and the
    # event loop's thread holds it while it encodes and sends chunks. With CPython's default
    # 5 ms switch interval, a kernel that returns while the loop runs waits up to 5 ms for it,
    # every time; 0.5 ms bounds that wait.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    server_app = OpenAIServer(engine, tokenizer, model_name, api_key)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.shutdown(timeout=0)  # ends the streams; the scheduler finishes its step alone
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                url = f"http://{host}:{self.servers[0].sockets[0].getsockname()[1]}" if self.servers else \
                    f"http://{host}:{port}"
                (ready or (lambda u: print(f"glm4rt: serving {model_name} at {u}/v1 (Ctrl-C stops)", flush=True)))(url)

    config = uvicorn.Config(server_app.app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=5)
    _Server(config).run()
    engine.shutdown()
