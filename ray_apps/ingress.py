"""The HTTP front of the kvtier Serve app: Ray Serve LLM's OpenAI ingress plus a
bearer token bound to a tenant, ``/health`` and ``/kvtier/stats``.

Everything OpenAI-shaped (request validation, completions, chat, streaming,
``/v1/models``, ``usage.prompt_tokens_details.cached_tokens``) is Ray Serve
LLM's ``OpenAiIngress`` over vLLM's own OpenAI layer; this module adds only what
kvtier needs on top:

  * ``TenantAuth``: an ASGI middleware that runs before any body is parsed.
    With tokens configured, every route but ``/health`` needs
    ``Authorization: Bearer <token>`` (else 401, an OpenAI-shaped JSON error);
    the token names the tenant (a token -> tenant map). A request may send
    ``X-KVTier-Tenant`` only with its own tenant's name (else 403): a tenant is
    bound to a credential, never self-declared. Without tokens the app is open
    and everyone is the default tenant "" (a tenant header is then refused).
  * ``KVTierIngress``: writes the tenant into the request's ``cache_salt``
    before the engine sees it. vLLM salts the first block's hash with it (so
    its own prefix cache never matches across tenants) and the kvtier
    connector derives the tier's keys from it, so one tenant's cached prefix
    is neither served to nor reported (``cached_tokens``) to another. A salt
    the client sent is kept inside the tenant's salt (hashed to keep vLLM's
    128-character limit).
  * ``/health`` (never needs the token): 200 when every engine answers its
    health check within 5 s, else 503. ``/kvtier/stats``: the tier's
    ``kvtier.stats()`` (hits, misses, blocks and bytes per tier).

It is not a server of its own: no sampling, no tokenization, no SSE framing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from typing import Any, Mapping

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress

TENANT_HEADER = "x-kvtier-tenant"
TENANT_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
MIN_TOKEN_CHARS = 8
OPEN_PATHS = ("/health",)
HEALTH_TIMEOUT_S = 5.0
STATS_TIMEOUT_S = 10.0  # kvtier.stats() asks the controller and every shard: ~10-50 ms when healthy

ENDPOINTS = {name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")}
ENDPOINTS["health"] = lambda app: app.get("/health")
ENDPOINTS["kvtier_stats"] = lambda app: app.get("/kvtier/stats")


def check_tokens(tokens: Mapping[str, str] | None) -> dict[str, str]:
    """``tokens`` (token -> tenant) validated; every error names the bad entry (never the whole token)."""
    if tokens is None:
        return {}
    if not isinstance(tokens, Mapping):
        raise ValueError(f"api_tokens must map token -> tenant, not {type(tokens).__name__}")
    out = {}
    for token, tenant in tokens.items():
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or token != token.strip():
            shown = token[:3] + "..." if isinstance(token, str) else repr(token)
            raise ValueError(f"api token {shown!r} must be a string of at least {MIN_TOKEN_CHARS} characters "
                             "without surrounding spaces")
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} (of token {token[:3]}...) must be up to 64 characters of letters, "
                             "digits, '.', '_' or '-'")
        out[token] = tenant
    return out


def cache_salt(tenant: str, client_salt: str | None) -> str:
    """The engine's ``cache_salt`` for a request of ``tenant`` (at most 99 characters, no '/' or '@')."""
    salt = f"t.{tenant}"
    if client_salt:
        salt += ":" + hashlib.sha256(client_salt.encode()).hexdigest()[:32]
    return salt


def _error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status)


class TenantAuth:
    """ASGI middleware: the bearer token -> tenant, in ``scope["state"]["kvtier_tenant"]``."""

    def __init__(self, app, tokens: Mapping[str, str]) -> None:
        self.app = app
        self.tokens = [(t.encode(), tenant) for t, tenant in tokens.items()]

    def tenant(self, headers: Mapping[str, str]) -> str | JSONResponse:
        claimed = headers.get(TENANT_HEADER)
        if not self.tokens:
            if claimed is not None:
                return _error(403, f"header X-KVTier-Tenant={claimed[:80]!r} refused: this app has no api tokens, so "
                              "every request is the default tenant (tenants are bound to tokens)",
                              "permission_error", "tenant_not_allowed")
            return ""
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        found = None
        for token, tenant in self.tokens:  # compare with every token: the time does not say which one is close
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
                found = tenant
        if found is None:
            return _error(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                          "authentication_error", "invalid_api_key")
        if claimed is not None and claimed != found:
            return _error(403, f"header X-KVTier-Tenant={claimed[:80]!r} does not match the tenant of this token",
                          "permission_error", "tenant_mismatch")
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _route(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        tenant = self.tenant(headers)
        if isinstance(tenant, Response):
            return await tenant(scope, receive, send)
        scope.setdefault("state", {})["kvtier_tenant"] = tenant
        return await self.app(scope, receive, send)


def _route(scope) -> str:
    """The request's path inside the app: ASGI's ``path`` includes ``root_path``, the app's Serve route prefix
    (``serve run ... route_prefix=/kvtier``: ``/kvtier/health``)."""
    path, root = scope.get("path") or "", (scope.get("root_path") or "").rstrip("/")
    return path[len(root):] if root and path.startswith(root + "/") else path


class KVTierIngress(OpenAiIngress):
    """``OpenAiIngress`` with tenant salts, a health route and the tier's stats."""

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, namespace: str | None = "kvtier",
                 **kwargs: Any) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._namespace = namespace  # None: an app without the kvtier connector (a baseline)

    @staticmethod
    def _salt(body, request: Request) -> None:
        tenant = getattr(request.state, "kvtier_tenant", "")
        body.cache_salt = cache_salt(tenant, body.cache_salt)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._salt(body, request)
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._salt(body, request)
        return await super().chat(body, request)

    async def health(self) -> Response:
        handles = list(self._default_serve_handles.items())
        try:
            await asyncio.wait_for(asyncio.gather(*[h.check_health.remote() for _, h in handles]), HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure or a timeout is "not healthy"
            return JSONResponse({"status": "unhealthy", "error": f"{type(e).__name__}: {str(e)[:300]}"},
                                status_code=503)
        return JSONResponse({"status": "ok", "models": [m for m, _ in handles]})

    async def kvtier_stats(self) -> Response:
        if self._namespace is None:
            return _error(404, "this app runs without the kvtier connector (kvtier=false): no tier stats",
                          "invalid_request_error", "kvtier_off")
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(_tier_stats, self._namespace), STATS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            return _error(503, f"tier stats unavailable: {type(e).__name__}: {str(e)[:300]}", "server_error",
                          "tier_unavailable")
        return JSONResponse(json.loads(json.dumps(stats, default=str)))


def _tier_stats(namespace: str) -> dict[str, Any]:
    """``kvtier.stats()`` of the running tier; never creates one (a missing tier is an error)."""
    import ray

    import kvtier
    from kvtier.runtime.names import CONTROLLER

    ray.get_actor(CONTROLLER, namespace=namespace)  # ValueError when the tier is not running
    kvtier.init(namespace=namespace)  # this replica is a Ray worker: joins, a no-op after the first call
    return {"namespace": namespace, **kvtier.stats()}


def make_app(tokens: Mapping[str, str]) -> FastAPI:
    """Ray Serve LLM's FastAPI app (its middlewares) with ``TenantAuth`` in front of them."""
    from ray.llm._internal.serve.core.ingress.ingress import init

    app = init()

    @app.exception_handler(StarletteHTTPException)
    async def _openai_shaped(_request, exc: StarletteHTTPException):
        # OpenAiIngress raises FastAPI's HTTPException for an unknown model (404): {"detail": ...} by default
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, str(exc.status_code))

    app.add_middleware(TenantAuth, tokens=dict(tokens))  # added last: runs first, before body parsing
    return app
