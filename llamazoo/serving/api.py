"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics and the chat page at /.

Requests are validated by the pydantic models below; every error a client can cause is a 4xx with
OpenAI's body `{"error": {"message", "type", "param", "code"}}`, `param` naming the field. A request
becomes `n` scheduler sequences (per prompt, for a list of prompts); their events cross from the
scheduler thread into the request's asyncio queue. A streamed request whose client goes away cancels
its sequences, which frees their rows at the scheduler's next step.
"""
from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamazoo.generation.chat import encode_chat
from llamazoo.generation.sampling import SamplingParams
from llamazoo.serving.metrics import Gauge, Metrics
from llamazoo.serving.scheduler import Event, QueueFull, Scheduler, Sequence

log = logging.getLogger("llamazoo.serve")

MAX_N = 32
MAX_STOP = 4
MAX_LOGPROBS = 20
PAGE = Path(__file__).with_name("page.html")


# -- errors ---------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, code, type_), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; pydantic's union-member tags ("str",
    "list[ContentPart]") are left out."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper()):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(e: RequestValidationError) -> JSONResponse:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return error_response(400, f"We could not parse the JSON body of your request: {err.get('ctx', {}).get('error', err['msg'])}. "
                              "Send a valid JSON object.", None, "invalid_json")
    param = _param(tuple(err["loc"]))
    if err["type"] == "missing":
        return error_response(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = err["msg"].removeprefix("Value error, ")
    if param is None:
        return error_response(400, f"The request body must be a JSON object ({msg}).", None, "invalid_request")
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return error_response(400, f"Invalid value for '{param}': {msg} (got {shown}).", param, "invalid_value")


# -- request models -------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The fields both endpoints share. Strict types (no "1" for 1, no "yes" for true); unknown fields
    are ignored, as OpenAI clients send extras this server has no use for."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: Any = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: generate max_tokens tokens (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("expected a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("only 0 is supported; use repetition_penalty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class CompletionRequest(_GenerationRequest):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of token-id lists."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(v, str):
            v = [v]
        elif ids(v):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(p, str) or ids(p) for p in v):
            raise ValueError("expected a non-empty string, a list of strings, a list of token ids or a list of "
                             "token-id lists")
        if any(p == "" for p in v):
            raise ValueError("a prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (candidates are not ranked)")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    response_format: dict | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict | None) -> dict | None:
        if v and v.get("type", "text") != "text":
            raise ValueError("only {\"type\": \"text\"} is supported")
        return v

    @model_validator(mode="after")
    def _top_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


# -- server state -----------------------------------------------------------------------------------------
@dataclass
class ServerState:
    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    max_seq_length: int
    defaults: Any  # the config's generation section: sampling defaults
    default_max_tokens: int | None = None  # None: the rest of the context
    default_seed: int | None = None
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    def sampling(self, req: _GenerationRequest) -> SamplingParams:
        """The request's values, else the config's generation.* values; temperature 0 is greedy."""
        d = self.defaults
        do_sample = d.do_sample if req.temperature is None else req.temperature > 0
        top_k = d.top_k if req.top_k is None else max(req.top_k, 0)
        return SamplingParams(
            do_sample=do_sample,
            temperature=req.temperature if req.temperature else d.temperature,
            top_k=top_k, top_p=d.top_p if req.top_p is None else req.top_p,
            min_p=d.min_p if req.min_p is None else req.min_p,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty)


# -- one request's sequences ---------------------------------------------------------------------------------
class Mailbox:
    """Hands events from the scheduler thread to the event loop: one wake-up for all the events posted
    before the loop gets to them (a decode step's tokens for every stream), instead of one per token,
    each of which makes the loop's thread take the GIL while a decode step is running."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()
        self._pending = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._pending:
                return
            self._pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._pending = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (one per event loop, so one wake-up serves every request of a step)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


class Job:
    """The sequences of one request and the queue their events arrive in (from the scheduler thread)."""

    def __init__(self, state: ServerState, prompts: list[list[int]], req: _GenerationRequest, max_tokens: int | None,
                 logprobs: int | None, param: str):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        box = mailbox(self.loop)
        params = state.sampling(req)
        stop = req.stop if req.stop is not None else list(state.defaults.stop)
        seed = req.seed if req.seed is not None else state.default_seed
        self.seqs: list[Sequence] = []
        for p_i, ids in enumerate(prompts):
            room = state.max_seq_length - len(ids)
            want = max_tokens if max_tokens is not None else state.default_max_tokens
            if want is None:
                want = room
            if want > room or room < 1:
                where = "max_tokens" if max_tokens is not None and len(ids) < state.max_seq_length else param
                raise APIError(400, f"This model's maximum context length is {state.max_seq_length} tokens. "
                                    f"However, you requested {len(ids) + max(want, 1)} tokens ({len(ids)} in the "
                                    f"{param}, {max(want, 1)} in the completion). Please shorten the {param} or "
                                    f"lower max_tokens.", where, "context_length_exceeded")
            for j in range(req.n):
                i = len(self.seqs)
                self.seqs.append(Sequence(
                    list(ids), want, params, None if seed is None else seed + j, list(stop), logprobs,
                    ignore_eos=req.ignore_eos,
                    on_event=lambda ev, i=i: box.post(self.queue, (i, ev))))

    def submit(self) -> None:
        try:
            self.state.scheduler.submit(self.seqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry shortly.", None, "rate_limit_exceeded",
                           "rate_limit_error", {"Retry-After": "1"}) from None
        m = self.state.metrics
        m.prompt_tokens.inc(sum(len(s.prompt_ids) for s in self.seqs))

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.done:
                self.state.scheduler.cancel(s)

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Events until every sequence finished; stops early (cancelling) when the client went away."""
        left = len(self.seqs)
        while left:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if ev.finish_reason is not None:
                left -= 1
                self.state.metrics.cached_tokens.inc(self.seqs[i].cached_tokens)
            yield i, ev

    def usage(self) -> dict[str, Any]:
        prompt = sum(len(s.prompt_ids) for s in self.seqs)
        completion = sum(len(s.tokens) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in self.seqs)}}

    def log_fields(self) -> str:
        u = self.usage()
        ttft = [s.first_token_at - s.arrival for s in self.seqs if s.first_token_at is not None]
        return (f"prompt={u['prompt_tokens']} cached={u['prompt_tokens_details']['cached_tokens']} "
                f"completion={u['completion_tokens']}" + (f" ttft={min(ttft):.3f}s" if ttft else ""))


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprobs(tok, ev: Event) -> dict[str, Any]:
    text = _token_text(tok, ev.token_id)
    return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := _token_text(tok, i)), "logprob": lp, "bytes": list(t.encode())}
                             for i, lp in ev.top_logprobs or []]}


def completion_logprobs(tok, evs: list[Event], offset: int = 0) -> dict[str, Any]:
    tokens = [_token_text(tok, e.token_id) for e in evs]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in evs],
            "top_logprobs": [{_token_text(tok, i): lp for i, lp in e.top_logprobs or []} for e in evs],
            "text_offset": offsets}


# -- the app ----------------------------------------------------------------------------------------------
class AccessLog:
    """ASGI middleware: one log line per request when its response ends (streams included), and the
    request counter. Handlers add fields through scope["llamazoo.log"]."""

    def __init__(self, app, metrics: Metrics, known: set[str]):
        self.app, self.metrics, self.known = app, metrics, known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        extra: dict[str, str] = {}
        scope["llamazoo.log"] = extra
        done = [False]

        def finish() -> None:
            if done[0]:
                return
            done[0] = True
            path = scope["path"]
            self.metrics.requests.inc(endpoint=path if path in self.known else "other", status=str(status[0]))
            client = scope.get("client") or ("-", 0)
            log.info('%s:%s "%s %s" %s %.3fs %s', client[0], client[1], scope["method"], path,
                     status[0] or "-", time.perf_counter() - t0, extra.get("fields", ""))

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, send_logged)
        finally:
            if not status[0]:
                status[0] = 499  # the client went away before a response started
            finish()


class JSONBodies:
    """ASGI middleware: POST bodies under /v1/ are JSON whatever their Content-Type says (curl -d sends
    application/x-www-form-urlencoded), so a missing header is not a confusing validation error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llamazoo serve", docs_url=None, redoc_url=None, openapi_url=None)
    tok = state.tokenizer
    sched = state.scheduler
    m = state.metrics
    m.gauges = [
        Gauge("llamazoo_queue_depth", "sequences waiting for a row", lambda: len(sched.waiting)),
        Gauge("llamazoo_running_sequences", "sequences being prefilled or decoded", lambda: len(sched.running)),
        Gauge("llamazoo_kv_cache_bytes", "bytes allocated for the KV cache", lambda: sched.slots.bytes()),
    ]
    known = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    app.add_middleware(JSONBodies)
    app.add_middleware(AccessLog, metrics=m, known=known)  # added last: outermost, sees every request

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return validation_error(e)

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, f"Unknown path {request.url.path}.", None, "not_found")
        if e.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed on {request.url.path}.", None,
                                  "method_not_allowed")
        return error_response(e.status_code, str(e.detail), None, None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request failed")
        return error_response(500, f"Internal server error: {type(e).__name__}: {e}", None, None, "server_error")

    def authorize(request: Request) -> None:
        if not state.api_key:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
            what = "No API key provided" if not got else "Incorrect API key provided"
            raise APIError(401, f"{what}. Send the header 'Authorization: Bearer <serve.api_key>'.", None,
                           "invalid_api_key", "authentication_error")

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
                           "model", "model_not_found")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        text = PAGE.read_text().replace("{{MODEL}}", html.escape(state.model_name))
        return HTMLResponse(text.replace("{{MODEL_JSON}}", json.dumps(state.model_name)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name, **sched.stats()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llamazoo", "max_model_len": state.max_seq_length}]}

    def encode_prompts(prompts: list[str | list[int]]) -> list[list[int]]:
        vocab = state.scheduler.engine.model.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                ids = tok.encode(p)
                if not ids:
                    raise APIError(400, f"Invalid value for '{where}': it encodes to no tokens.", where, "invalid_value")
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"Invalid value for '{where}': token id {bad[0]} is outside the vocabulary "
                                        f"(0..{vocab - 1}).", where, "invalid_value")
                ids = list(p)
            out.append(ids)
        return out

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        authorize(request)
        check_model(req.model)
        job = Job(state, encode_prompts(req.prompt), req, req.max_tokens, req.logprobs, "prompt")
        return await respond(job, req, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        authorize(request)
        check_model(req.model)
        if not tok.chat_template:
            raise APIError(400, f"The model `{state.model_name}` has no chat template; use /v1/completions.",
                           "messages", "no_chat_template")
        messages = [{"role": "system" if m_.role == "developer" else m_.role, "content": m_.text()}
                    for m_ in req.messages]
        try:
            ids = encode_chat(tok, messages)
        except Exception as e:  # noqa: BLE001 - a template may reject a conversation (e.g. role order)
            raise APIError(400, f"The chat template cannot format these messages: {e}", "messages",
                           "invalid_value") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(state, [ids], req, max_tokens, logprobs, "messages")
        return await respond(job, req, request, chat=True)

    async def respond(job: Job, req: _GenerationRequest, request: Request, chat: bool):
        job.submit()
        extra = request.scope.get("llamazoo.log", {})
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            gen = stream(job, req, request, chat, rid, created, extra)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        per: dict[int, list[Event]] = {i: [] for i in range(len(job.seqs))}
        try:
            async for i, ev in job.events(request):
                per[i].append(ev)
        finally:
            job.cancel()
            extra["fields"] = job.log_fields()
        errors = [ev.error for evs in per.values() for ev in evs if ev.finish_reason == "error"]
        if errors:
            raise APIError(500, f"Generation failed: {errors[0]}", None, None, "server_error")
        choices = []
        for i, s in enumerate(job.seqs):
            toks = [e for e in per[i] if e.token_id is not None]
            if chat:
                lp = {"content": [chat_logprobs(tok, e) for e in toks]} if s.logprobs is not None else None
                choices.append({"index": i, "message": {"role": "assistant", "content": s.text},
                                "logprobs": lp, "finish_reason": s.finish_reason})
            else:
                lp = completion_logprobs(tok, toks) if s.logprobs is not None else None
                choices.append({"index": i, "text": s.text, "logprobs": lp, "finish_reason": s.finish_reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": state.model_name, "choices": choices, "usage": job.usage(), "system_fingerprint": None}

    async def stream(job: Job, req: _GenerationRequest, request: Request, chat: bool, rid: str, created: int,
                     extra: dict) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **more: Any) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices,
                    "system_fingerprint": None, **more}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        offsets = [0] * len(job.seqs)
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.seqs))])
            async for i, ev in job.events(request):
                if ev.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(f'Generation failed: {ev.error}', None, None, 'server_error'))}\n\n"
                    continue
                s = job.seqs[i]
                has_lp = s.logprobs is not None and ev.token_id is not None
                if not ev.text and not has_lp and ev.finish_reason is None:
                    continue
                if chat:
                    lp = {"content": [chat_logprobs(tok, ev)]} if has_lp else None
                    delta = {"content": ev.text} if ev.text or has_lp else {}
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
                else:
                    lp = completion_logprobs(tok, [ev], offsets[i]) if has_lp else None
                    offsets[i] += len(ev.text)
                    yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], usage=job.usage())
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or we are done): free the rows
            extra["fields"] = job.log_fields()

    return app
