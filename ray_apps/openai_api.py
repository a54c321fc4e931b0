"""The OpenAI-compatible HTTP surface, as pure Python: request validation,
response and server-sent-event formatting, limits, auth and tenant headers,
and stop-sequence handling for streamed text.

Requests are parsed by hand from the JSON body (not by pydantic/FastAPI) so
that every rejection is an ``APIError`` with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` naming the bad field and,
for a limit, the limit. Features this server does not implement (``n > 1``,
``logprobs``, ``echo``, penalties, tools...) are rejected by name, never
silently ignored. Unknown fields are ignored, as OpenAI-compatible servers do.

This module knows nothing of Ray, models or tiers; ``ray_apps.serve`` uses it.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

TENANT_HEADER = "X-KVTier-Tenant"
_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
DONE = b"data: [DONE]\n\n"


class APIError(Exception):
    """A request the server refuses; ``body()`` is the JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # crosses Ray process boundaries (raised in a worker, caught in the ingress)
        return (APIError, (self.status, self.message, self.param, self.code, self.type))


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """Explicit request limits; each is named in the error when exceeded."""

    max_prompt_tokens: int = 4096      # SmolLM2 has 8192 positions; half leaves room for output, ~1 s prefill on 2 cores per 1K
    max_tokens_cap: int = 512          # largest max_tokens a request may ask for
    default_max_tokens: int = 16       # OpenAI's completions default
    max_body_bytes: int = 1 << 20      # 1 MiB of JSON is ~250K tokens of text, far over max_prompt_tokens
    max_batch: int = 8                 # prompts in one /v1/completions request
    max_messages: int = 256            # messages in one chat request
    max_stop: int = 4                  # stop sequences (OpenAI's own limit)
    max_stop_chars: int = 256

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"limit {name}={v!r} must be a positive int")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_cap={self.max_tokens_cap}")

    @classmethod
    def from_any(cls, value: "Limits | dict | None") -> "Limits":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown limit(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"limits must be a dict or Limits, not {type(value).__name__}")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stop)}


@dataclass(frozen=True)
class Request:
    """A validated completion (``chat=False``, one or more ``prompts``) or chat request."""

    chat: bool
    model: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    prompts: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def inputs(self) -> list[dict[str, Any]]:
        """What a prefill worker tokenizes: one dict per choice."""
        if self.chat:
            return [{"messages": [dict(m) for m in self.messages]}]
        return [{"prompt": p} for p in self.prompts]


# ---- parsing ------------------------------------------------------------------
def parse_body(raw: bytes, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit max_body_bytes={limits.max_body_bytes}",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _unsupported(body: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name, ok in defaults.items():
        v = body.get(name)
        if v is not None and v not in ok:
            raise bad(name, f"{name}={v!r} is not supported by this server (allowed: {sorted(map(str, ok))} or omit it)",
                      code="unsupported_parameter")


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise bad(name, f"{name}={v!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _sampling(body: dict[str, Any], limits: Limits, max_name: str = "max_tokens") -> Sampling:
    mt = body.get(max_name)
    if mt is None:
        mt = limits.default_max_tokens
    elif isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise bad(max_name, f"{max_name}={mt!r} must be a positive integer")
    elif mt > limits.max_tokens_cap:
        raise bad(max_name, f"{max_name}={mt} exceeds this server's limit max_tokens_cap={limits.max_tokens_cap}",
                  code="max_tokens_exceeded")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise bad("seed", f"seed={seed!r} must be an integer")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(stops) > limits.max_stop:
        raise bad("stop", f"{len(stops)} stop sequences exceed the limit max_stop={limits.max_stop}")
    for s in stops:
        if not s or len(s) > limits.max_stop_chars:
            raise bad("stop", f"stop sequence {s[:40]!r} must have 1..{limits.max_stop_chars} characters (limit max_stop_chars)")
    return Sampling(max_tokens=mt, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), seed=seed, stop=stops)


def _common(body: dict[str, Any], served_model: str) -> tuple[str, bool, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: a string naming the model (see GET /v1/models)", code="missing_required_parameter")
    if served_model and model != served_model:
        raise APIError(404, f"model {model!r} is not served here; this server serves {served_model!r}",
                       param="model", code="model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream={stream!r} must be a boolean")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise bad("stream_options", "stream_options must be an object like {\"include_usage\": true}")
        include_usage = bool(opts.get("include_usage", False))
    return model, bool(stream), include_usage


_UNSUPPORTED_COMMON = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}


def parse_completion(body: dict[str, Any], limits: Limits, served_model: str = "") -> Request:
    """``POST /v1/completions``: ``prompt`` is a string or a list of up to ``max_batch`` strings."""
    model, stream, include_usage = _common(body, served_model)
    _unsupported(body, {**_UNSUPPORTED_COMMON, "best_of": (1,), "logprobs": (), "echo": (False,), "suffix": ("",)})
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif prompt is None:
        raise bad("prompt", "prompt is required: a string or a list of strings", code="missing_required_parameter")
    else:
        raise bad("prompt", f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    if len(prompts) > limits.max_batch:
        raise bad("prompt", f"{len(prompts)} prompts exceed the limit max_batch={limits.max_batch}", code="batch_too_large")
    if not all(prompts):
        raise bad("prompt", "prompt must not be empty")
    return Request(chat=False, model=model, sampling=_sampling(body, limits), stream=stream,
                   include_usage=include_usage, prompts=prompts)


_ROLES = ("system", "user", "assistant", "developer")


def parse_chat(body: dict[str, Any], limits: Limits, served_model: str = "") -> Request:
    """``POST /v1/chat/completions``: ``messages`` of {role, content (a string or text parts)}."""
    model, stream, include_usage = _common(body, served_model)
    _unsupported(body, {**_UNSUPPORTED_COMMON, "logprobs": (False,), "top_logprobs": (), "tools": ([],),
                        "tool_choice": ("none",), "functions": (), "response_format": ({"type": "text"},)})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages is required: a non-empty list of {role, content} objects",
                  code="missing_required_parameter" if msgs is None else "invalid_value")
    if len(msgs) > limits.max_messages:
        raise bad("messages", f"{len(msgs)} messages exceed the limit max_messages={limits.max_messages}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role={role!r} must be one of {list(_ROLES)}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content", f"messages[{i}].content parts must all be {{type: 'text', text: str}}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Request(chat=True, model=model, sampling=_sampling(body, limits, max_name), stream=stream,
                   include_usage=include_usage, messages=tuple(out))


# ---- auth and tenant ----------------------------------------------------------
def check_auth(authorization: str | None, token: str | None) -> None:
    """401 unless ``Authorization: Bearer <token>`` matches (when a token is set)."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                       type="authentication_error", code="invalid_api_key")


def tenant_of(header: str | None, default: str = "") -> str:
    if header is None:
        return default
    if not _TENANT_RE.fullmatch(header):
        raise APIError(400, f"header {TENANT_HEADER}={header[:80]!r} must be up to 64 characters of letters, "
                       "digits, '.', '_' or '-'", param=TENANT_HEADER, code="invalid_tenant")
    return header


def tenant_tokens(spec: str | None) -> dict[str, str]:
    """``"token1=tenant-a,token2=tenant-b"`` (``$KVTIER_TENANT_TOKENS``) -> {token: tenant}. Each bearer
    token is the credential of one tenant; a token shorter than 16 characters is refused by name."""
    out: dict[str, str] = {}
    for i, item in enumerate(x for x in (spec or "").split(",") if x.strip()):
        token, sep, tenant = item.strip().rpartition("=")
        if not sep or len(token) < 16 or not _TENANT_RE.fullmatch(tenant):
            raise ValueError(f"KVTIER_TENANT_TOKENS entry #{i} must be <token of 16+ characters>=<tenant>, "
                             f"tenant of letters, digits, '.', '_', '-' (got tenant {tenant[:64]!r})")
        if token in out:
            raise ValueError(f"KVTIER_TENANT_TOKENS entry #{i}: a token is given twice")
        out[token] = tenant
    return out


def bound_tenant(authorization: str | None, header: str | None, tokens: dict[str, str], default: str = "") -> str:
    """The caller's tenant, bound to its credential: with ``tokens``, the bearer token names the tenant
    (401 for an unknown one) and a ``X-KVTier-Tenant`` header may only repeat it (403 otherwise); without
    ``tokens`` every caller is the default tenant and a header naming another tenant is a 403, since a
    self-declared tenant would let any caller read (and learn ``cached_tokens`` of) another's blocks."""
    claimed = tenant_of(header, default)
    if tokens:
        scheme, _, given = (authorization or "").partition(" ")
        tenant = next((t for tok, t in tokens.items() if hmac.compare_digest(given.strip().encode(), tok.encode())), None)
        if scheme.lower() != "bearer" or tenant is None:
            raise APIError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                           type="authentication_error", code="invalid_api_key")
    else:
        tenant = default
    if header is not None and claimed != tenant:
        raise APIError(403, f"header {TENANT_HEADER}={header[:64]!r} names a tenant this credential is not bound to "
                       "(tenants are bound to bearer tokens by KVTIER_TENANT_TOKENS)", param=TENANT_HEADER,
                       type="permission_error", code="tenant_not_allowed")
    return tenant


# ---- responses ----------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(req: Request, choices: list[tuple[str, str]], use: dict[str, Any]) -> dict[str, Any]:
    """A whole (non-streamed) response; ``choices`` are (text, finish_reason)."""
    if req.chat:
        return {"id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": req.created, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                             "logprobs": None} for i, (t, f) in enumerate(choices)], "usage": use}
    return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": req.model,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(choices)],
            "usage": use}


def chunk(req: Request, index: int, text: str | None, finish: str | None = None, *, first: bool = False,
          use: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed event; ``index=-1`` with ``use`` is the final usage-only chunk."""
    if req.chat:
        choices = [] if index < 0 else [{"index": index, "finish_reason": finish, "logprobs": None,
                                         "delta": ({"role": "assistant", "content": text or ""} if first else
                                                   ({"content": text} if text else {}))}]
        out = {"id": f"chatcmpl-{req.id}", "object": "chat.completion.chunk", "created": req.created,
               "model": req.model, "choices": choices}
    else:
        choices = [] if index < 0 else [{"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}]
        out = {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": req.model,
               "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# ---- stop sequences over streamed text ----------------------------------------
def first_stop(text: str, stops: tuple[str, ...] | list[str]) -> int | None:
    """Where generation cuts ``text``: at the start of the stop sequence that is
    *completed* first (as tokens arrive), the longest one if several end there."""
    best: tuple[int, int] | None = None  # (end, start)
    for s in stops:
        i = text.find(s) if s else -1
        if i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return None if best is None else best[1]


class StopBuffer:
    """Cuts streamed text at the first stop sequence, holding back only as many
    characters as could still begin one, so no stop text ever reaches the client.

    >>> s = StopBuffer(["\\n\\n"]); s.feed("a\\n"), s.feed("\\nb"), s.stopped
    ('a', '', True)
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.text = ""  # everything emitted

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + delta
        cut = first_stop(buf, self.stops)
        if cut is not None:
            self.stopped = True
            out, self._pending = buf[:cut], ""
        else:
            # keep the longest suffix that is a proper prefix of some stop sequence
            keep = 0
            for k in range(min(self._hold, len(buf)), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stops):
                    keep = k
                    break
            out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (no stop sequence followed)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        self.text += out
        return out
