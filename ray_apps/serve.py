"""The kvtier Ray Serve app: an OpenAI-compatible HTTP API over disaggregated
prefill and decode workers that share KV through kvtier.

    serve run ray_apps.serve:app                        # defaults; tier config from $KVTIER_CONFIG
    serve run ray_apps.serve:build_app tier=tier.json decode_replicas=2
    KVTIER_API_TOKEN=... kvtier serve --tier tier.json --host 0.0.0.0 --port 8000

Three deployments: ``Ingress`` (FastAPI: auth, validation, SSE, counters; no
model, no torch), ``Prefill`` and ``Decode`` (``ray_apps.workers``; one model
per replica, replica counts from the args). A request goes Ingress -> Prefill
(tokenize, tier lookup, compute missing chunks, hand off) -> Decode (pull,
generate, stream). If the Prefill call fails, Decode recomputes the prompt.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
gives ``data: {...}`` events ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` (never needs the token), ``GET /kvtier/stats``.

App args (a dict; strings from ``serve run`` are converted): ``tier`` (alias
``tier_config``: a dict of TierConfig fields or a JSON file path; default
``$KVTIER_CONFIG``), ``model``,
``dtype``, ``device``, ``transport``, ``namespace``, ``torch_threads``,
``prefill_replicas``, ``decode_replicas``, ``ingress_replicas``, ``num_cpus``
and ``num_gpus`` per worker replica, ``limits`` (dict, see
``openai_api.Limits``), ``api_token`` (else ``$KVTIER_API_TOKEN``),
``tenant`` (default tenant), ``tenant_tokens`` (else ``$KVTIER_TENANT_TOKENS``:
``token=tenant,...``; a caller's tenant is the one its bearer token is bound to, and
without a map every caller is the default tenant), ``host``/``port`` (used by ``kvtier serve``).
"""

# no ``from __future__ import annotations``: FastAPI must see the real Request type under @serve.ingress
import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_apps.openai_api import (_TENANT_RE, DONE, TENANT_HEADER, APIError, Limits, Request as ApiRequest, bound_tenant,
                                 check_auth, chunk, parse_body, parse_chat, parse_completion, response, sse,
                                 tenant_tokens, usage)

log = logging.getLogger(__name__)
api = FastAPI(title="kvtier", docs_url=None, redoc_url=None)

_WORKER_KEYS = ("model", "dtype", "device", "transport", "transfer_host", "namespace", "torch_threads")
_INT_KEYS = ("prefill_replicas", "decode_replicas", "ingress_replicas", "port", "torch_threads")
_FLOAT_KEYS = ("num_cpus", "num_gpus")
DEFAULTS: dict[str, Any] = {"prefill_replicas": 1, "decode_replicas": 1, "ingress_replicas": 1, "num_cpus": 1.0,
                            "num_gpus": 0.0, "host": "127.0.0.1", "port": 8000, "api_token": None, "tenant": "",
                            "tenant_tokens": None, "limits": None, "tier": None}


def settings_from_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """Validated app settings from ``args``; every error names the bad arg."""
    from kvtier.config import TierConfig

    args = dict(args or {})
    for alias in ("tier_config", "config"):  # the Helm chart passes tier_config (a mounted JSON file)
        if alias in args:
            if "tier" in args:
                raise ValueError(f"app args tier and {alias} both given; pass one")
            args["tier"] = args.pop(alias)
    known = set(DEFAULTS) | set(_WORKER_KEYS)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown app arg(s) {unknown}; known: {sorted(known)}")
    s = {**DEFAULTS, **args}
    for k in _INT_KEYS + _FLOAT_KEYS:
        if k in s and isinstance(s[k], str):
            try:
                s[k] = int(s[k]) if k in _INT_KEYS else float(s[k])
            except ValueError:
                raise ValueError(f"app arg {k}={s[k]!r} is not a number") from None
    for k in ("prefill_replicas", "decode_replicas", "ingress_replicas"):
        if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 1:
            raise ValueError(f"app arg {k}={s[k]!r} must be an int >= 1")
    if not isinstance(s["port"], int) or not 0 < s["port"] < 65536:
        raise ValueError(f"app arg port={s['port']!r} must be a TCP port")
    tier = s["tier"]
    if tier is None:
        tier = TierConfig.from_env()
    elif isinstance(tier, str):
        tier = TierConfig.from_file(tier)
    else:
        tier = TierConfig.from_any(tier)
    s["tier"] = tier.to_dict()
    limits = json.loads(s["limits"]) if isinstance(s["limits"], str) else s["limits"]
    s["limits"] = dataclasses.asdict(Limits.from_any(limits))
    if not isinstance(s["tenant"], str) or not _TENANT_RE.fullmatch(s["tenant"]):
        raise ValueError(f"app arg tenant={s['tenant']!r} must be up to 64 characters of letters, digits, '.', '_' or '-'")
    s["tenant"] = s["tenant"] or tier.tenant
    # read here (the driver's environment), not only in the Ingress replica, which may run elsewhere
    s["api_token"] = s["api_token"] or os.environ.get("KVTIER_API_TOKEN") or None
    if s["api_token"] is not None and (not isinstance(s["api_token"], str) or len(s["api_token"]) < 8):
        raise ValueError("app arg api_token must be a string of at least 8 characters")
    s["tenant_tokens"] = s["tenant_tokens"] or os.environ.get("KVTIER_TENANT_TOKENS") or None
    tenant_tokens(s["tenant_tokens"])  # a bad map is named at startup, not at the first request
    return s


def worker_config(s: dict[str, Any]) -> dict[str, Any]:
    out = {k: s[k] for k in _WORKER_KEYS if k in s}
    return {**out, "tier": s["tier"], "max_prompt_tokens": s["limits"]["max_prompt_tokens"]}


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _api_error(e: BaseException) -> APIError | None:
    """The APIError behind ``e`` (Ray wraps exceptions raised in a worker)."""
    for x in (e, getattr(e, "cause", None), e.__cause__):
        if isinstance(x, APIError):
            return x
    return None


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request, exc: StarletteHTTPException):  # 404/405 in the OpenAI error shape
    return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                   "code": str(exc.status_code)}}, status_code=exc.status_code)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, prefill, decode, settings: dict[str, Any]) -> None:
        self.prefill, self.decode = prefill, decode
        self.limits = Limits.from_any(settings["limits"])
        self.token = settings.get("api_token") or os.environ.get("KVTIER_API_TOKEN") or None
        self.tenant = settings.get("tenant", "")
        # bearer token -> tenant: a caller's tenant is the one its token is bound to, never a header's claim
        self.tenant_tokens = tenant_tokens(settings.get("tenant_tokens") or os.environ.get("KVTIER_TENANT_TOKENS"))
        self._info: dict[str, Any] | None = None
        self.counters = {"requests": 0, "rejected": 0, "choices": 0, "prompt_tokens": 0, "cached_tokens": 0,
                         "completion_tokens": 0, "prefill_failures": 0, "handed_off_chunks": 0, "recomputed_chunks": 0}

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.prefill.info.remote()
        return self._info

    def _denied(self, request: Request) -> JSONResponse | None:
        """The 401 answer for a request without the bearer token, or None when it may pass."""
        try:
            check_auth(request.headers.get("authorization"), self.token)
        except APIError as e:
            return _error(e)
        return None

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        info = await self.info()
        return {"object": "list", "data": [{"id": info["model"], "object": "model", "created": 0, "owned_by": "kvtier",
                                            "max_model_len": info["max_positions"]}]}

    @api.get("/kvtier/stats")
    async def stats(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        prefill, decode = await asyncio.gather(self.prefill.stats.remote(), self.decode.stats.remote())
        return {"ingress": dict(self.counters), "limits": dataclasses.asdict(self.limits), "prefill": prefill,
                "decode": decode}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    # ---- the request path -----------------------------------------------
    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        cap = self.limits.max_body_bytes
        if declared and declared.isdigit() and int(declared) > cap:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit max_body_bytes={cap}",
                           code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cap:
                raise APIError(413, f"request body exceeds the limit max_body_bytes={cap}", code="request_too_large")
        return bytes(raw)

    async def _handle(self, request: Request, chat: bool):
        self.counters["requests"] += 1
        try:
            if not self.tenant_tokens:  # with a token -> tenant map, the tenant's token is the credential
                check_auth(request.headers.get("authorization"), self.token)
            tenant = bound_tenant(request.headers.get("authorization"), request.headers.get(TENANT_HEADER),
                                  self.tenant_tokens, self.tenant)
            body = parse_body(await self._read(request), self.limits)
            served = (await self.info())["model"]
            req = (parse_chat if chat else parse_completion)(body, self.limits, served)
            sampling = req.sampling.to_dict()
            inputs = req.inputs()
            handoffs = await asyncio.gather(*[self._prefill(inp, tenant, sampling) for inp in inputs])
        except APIError as e:
            self.counters["rejected"] += 1
            return _error(e)
        runs = [(inp, h) for inp, h in zip(inputs, handoffs)]
        if req.stream:
            return StreamingResponse(self._sse(req, tenant, runs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            results = await asyncio.gather(*[self._collect(tenant, sampling, inp, h) for inp, h in runs])
        except Exception as e:  # noqa: BLE001 - a worker failure after validation
            err = _api_error(e) or APIError(500, f"generation failed: {type(e).__name__}: {str(e)[:300]}",
                                            type="server_error", code="internal_error")
            return _error(err)
        total = self._account([u for _, _, u in results])
        return response(req, [(t, f) for t, f, _ in results], total)

    async def _prefill(self, inp: dict, tenant: str, sampling: dict) -> dict | None:
        try:
            return await self.prefill.prefill.remote(inp, tenant, sampling)
        except Exception as e:  # noqa: BLE001
            err = _api_error(e)
            if err is not None:
                raise err from None
            # a dead or failing prefill worker: the decode worker recomputes the prompt (issue 6)
            log.warning("prefill failed (%s: %s); decode will recompute", type(e).__name__, str(e)[:200])
            self.counters["prefill_failures"] += 1
            return None

    def _events(self, tenant: str, sampling: dict, inp: dict, handoff: dict | None):
        return self.decode.options(stream=True).generate.remote(inp, tenant, sampling, handoff)

    async def _collect(self, tenant: str, sampling: dict, inp: dict, handoff: dict | None):
        parts, finish, use = [], "length", {}
        async for ev in self._events(tenant, sampling, inp, handoff):
            parts.append(ev["text"])
            if "finish_reason" in ev:
                finish, use = ev["finish_reason"], {**ev["usage"], **ev["kvtier"]}
        return "".join(parts), finish, use

    def _account(self, uses: list[dict]) -> dict[str, Any]:
        c = self.counters
        p, g, k = (sum(u.get(x, 0) for u in uses) for x in ("prompt_tokens", "completion_tokens", "cached_tokens"))
        c["choices"] += len(uses)
        c["prompt_tokens"] += p
        c["completion_tokens"] += g
        c["cached_tokens"] += k
        c["handed_off_chunks"] += sum(u.get("handed_off_chunks", 0) for u in uses)
        c["recomputed_chunks"] += sum(u.get("recomputed_chunks", 0) for u in uses)
        return usage(p, g, k)

    async def _sse(self, req: ApiRequest, tenant: str, runs: list) -> AsyncIterator[bytes]:
        uses = []
        sampling = req.sampling.to_dict()
        try:
            for i, (inp, handoff) in enumerate(runs):
                if req.chat:
                    yield sse(chunk(req, i, "", first=True))
                async for ev in self._events(tenant, sampling, inp, handoff):
                    if ev["text"]:
                        yield sse(chunk(req, i, ev["text"]))
                    if "finish_reason" in ev:
                        uses.append({**ev["usage"], **ev["kvtier"]})
                        yield sse(chunk(req, i, None, ev["finish_reason"]))
            total = self._account(uses)
            if req.include_usage:
                yield sse(chunk(req, -1, None, use=total))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, then end the stream
            err = _api_error(e) or APIError(500, f"generation failed: {type(e).__name__}: {str(e)[:300]}",
                                            type="server_error", code="internal_error")
            yield sse(err.body())
        yield DONE


def build_app(args: dict[str, Any] | None = None):
    """The Serve application for ``args`` (see the module docstring)."""
    from ray_apps.workers import DecodeWorker, PrefillWorker, WorkerConfig

    s = settings_from_args(args)
    wcfg = WorkerConfig.from_any(worker_config(s))  # validate here, not in a replica's constructor
    opts = {"num_cpus": s["num_cpus"], "num_gpus": s["num_gpus"]}
    prefill = serve.deployment(PrefillWorker, name="Prefill", num_replicas=s["prefill_replicas"],
                               ray_actor_options=opts, max_ongoing_requests=8)
    decode = serve.deployment(DecodeWorker, name="Decode", num_replicas=s["decode_replicas"],
                              ray_actor_options=opts, max_ongoing_requests=8)
    settings = {"limits": s["limits"], "api_token": s["api_token"], "tenant": s["tenant"]}
    return Ingress.options(num_replicas=s["ingress_replicas"]).bind(prefill.bind(wcfg), decode.bind(wcfg), settings)


# ``serve run ray_apps.serve:app`` and a RayService's ``import_path: ray_apps.serve:app``
# (with ``args``) both call this builder; it imports nothing heavy until called
app = build_app


def main(argv: list[str] | None = None) -> int:
    """``kvtier serve``: start (or join) Ray, start Serve on host:port, run the app until interrupted."""
    p = argparse.ArgumentParser(prog="kvtier serve", description="OpenAI-compatible HTTP API over kvtier (Ray Serve)")
    p.add_argument("--tier", help="tier config: a JSON file (default $KVTIER_CONFIG or the defaults)")
    p.add_argument("--model", help="local model folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--transport", default="auto", choices=["auto", "nixl", "object_store"])
    p.add_argument("--transfer-host", help="address other workers reach this node's NIXL agents at (default: the Ray node IP)")
    p.add_argument("--prefill-replicas", type=int, default=1)
    p.add_argument("--decode-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per worker replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per worker replica")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP API binds (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--limits", help='JSON object of limits, e.g. \'{"max_prompt_tokens": 2048}\'')
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    a = p.parse_args(argv)
    args = {"tier": a.tier, "model": a.model, "dtype": a.dtype, "device": a.device, "transport": a.transport,
            "transfer_host": a.transfer_host,
            "prefill_replicas": a.prefill_replicas, "decode_replicas": a.decode_replicas, "num_cpus": a.num_cpus,
            "num_gpus": a.num_gpus, "host": a.host, "port": a.port, "limits": a.limits}
    try:
        application = build_app({k: v for k, v in args.items() if v is not None})
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"kvtier serve: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=a.address, namespace="kvtier", include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    serve.run(application, name="kvtier", route_prefix="/")
    print(f"kvtier serve: OpenAI-compatible API on http://{a.host}:{a.port}/v1 (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - Ctrl-C in a terminal also stops a local Ray's processes
            print(f"kvtier serve: Serve was already down ({type(e).__name__})", file=sys.stderr)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
