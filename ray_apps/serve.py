"""The kvtier Serve app: Ray Serve LLM over vLLM engines whose KV connector is kvtier's.

    serve run ray_apps.serve:app                                  # CPU, one engine, SmolLM2-135M
    serve run ray_apps.serve:app replicas=2                       # two engines sharing the tier
    serve run ray_apps.serve:app shape=pd                         # prefill/decode, KV through kvtier
    serve run ray_apps.serve:app accelerator=gpu model=/models/llama-8b dtype=bfloat16
    KVTIER_API_TOKENS='{"tok-a-...": "team-a"}' kvtier serve --replicas 2 --port 8000

Two shapes from the ``shape`` arg:
  * ``shared``: ``replicas`` vLLM engines behind Ray Serve LLM's OpenAI ingress;
    every engine saves the prompt's KV chunks to the tier and loads what the
    tier has, so a prefix computed on one replica is reused by the others.
  * ``pd``: Ray Serve LLM's prefill/decode graph (ingress -> decode -> prefill):
    prefill computes the prompt and saves its KV to the tier, decode loads it.

The engines start or join the tier (``tier_backend.KVTierBackend``): a replica
joins its Ray cluster's tier in ``namespace``, creating the controller and shards
with ``tier`` (TierConfig fields) when it is the first. HTTP: completions, chat,
streaming, ``/v1/models`` (Ray Serve LLM / vLLM), plus ``/health``, ``/kvtier/stats``
and tokens bound to tenants (``ray_apps.ingress``).

App args (a dict; the strings of ``serve run k=v`` are converted): see
``AppConfig``. CPU is the default (``accelerator_config={"kind": "cpu"}``, one
CPU per engine); ``accelerator=gpu`` gives each engine ``tensor_parallel_size``
GPUs (of ``accelerator_type`` when set) and vLLM's GPU memory sizing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ray_apps.ingress import TENANT_RE, check_tokens

SHAPES = ("shared", "pd")
DTYPES = ("float32", "bfloat16", "float16")
ROLES = ("engine", "prefill", "decode")
ENGINE_ENV = {
    # the engines are spawned subprocesses; kvtier's code must be importable there too
    "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    # vLLM's hashes of prompt blocks are reproducible across processes only with a fixed seed
    # (../shared/VLLM.md); kvtier's keys do not depend on it, vLLM's prefix cache does
    "PYTHONHASHSEED": "0",
}


@dataclass(frozen=True)
class AppConfig:
    """The app's settings; ``from_args`` converts ``serve run`` strings and names every bad value.

    shape            "shared" (replicas share the tier) or "pd" (prefill/decode)
    model            local Hugging Face folder; None = SmolLM2-135M-Instruct (kvtier.model's cached copy)
    model_id         the name clients send as ``model``; default: the folder's name
    replicas         engines in the shared shape
    prefill_replicas, decode_replicas   engines in the pd shape
    accelerator      "cpu" or "gpu"; accelerator_type e.g. "H100" (GPU only), tensor_parallel_size
    dtype, max_model_len, block_size    vLLM engine args (block_size None = vLLM's default)
    kv_cache_bytes   vLLM's KV cache per engine (CPU default 512 MiB; GPU: gpu_memory_utilization)
    cpu_reserved     CPU only: cores each engine keeps free of its OpenMP threads (vLLM's
                     VLLM_CPU_NUM_OF_RESERVED_CPU), the same with and without kvtier; None = vLLM's own
                     default without a connector (tensor_parallel_size: one core for the scheduler process)
    prefix_caching   vLLM's own in-engine prefix cache (on: the engine's memory is the first tier)
    kvtier           the kvtier connector on (off: the same app without it, a baseline)
    tier             TierConfig fields (dict) or a JSON file; default $KVTIER_CONFIG / the defaults
    namespace        the tier's Ray namespace; address: the Ray address the engines join (None = this cluster)
    api_tokens       token -> tenant; api_token/tenant: one token (else $KVTIER_API_TOKENS / $KVTIER_API_TOKEN)
    engine_kwargs    more vLLM engine args, merged last
    engine_resources custom Ray resources in each engine's placement bundle, per role ("engine" in the
                     shared shape, "prefill"/"decode" in pd): how the Helm chart puts engines on their pods
    host, port       where ``kvtier serve`` binds
    """

    shape: str = "shared"
    model: str | None = None
    model_id: str | None = None
    replicas: int = 1
    prefill_replicas: int = 1
    decode_replicas: int = 1
    accelerator: str = "cpu"
    accelerator_type: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    max_model_len: int = 4096
    block_size: int | None = None
    kv_cache_bytes: int | None = None
    cpu_reserved: int | None = None
    prefix_caching: bool = True
    kvtier: bool = True
    tier: dict = field(default_factory=dict)
    namespace: str = "kvtier"
    address: str | None = None
    api_tokens: dict = field(default_factory=dict)
    engine_kwargs: dict = field(default_factory=dict)
    engine_resources: dict = field(default_factory=dict)
    max_ongoing_requests: int = 64
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"app arg shape={self.shape!r} must be one of {list(SHAPES)}")
        for k in ("replicas", "prefill_replicas", "decode_replicas", "tensor_parallel_size", "max_model_len",
                  "max_ongoing_requests"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"app arg {k}={v!r} must be an int >= 1")
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"app arg accelerator={self.accelerator!r} must be 'cpu' or 'gpu'")
        if self.accelerator == "cpu" and (self.accelerator_type or self.tensor_parallel_size != 1):
            raise ValueError("app args accelerator_type and tensor_parallel_size > 1 need accelerator='gpu'")
        if self.dtype not in DTYPES:
            raise ValueError(f"app arg dtype={self.dtype!r} must be one of {list(DTYPES)}")
        if self.cpu_reserved is not None and (not isinstance(self.cpu_reserved, int) or isinstance(
                self.cpu_reserved, bool) or self.cpu_reserved < 0 or self.accelerator != "cpu"):
            raise ValueError(f"app arg cpu_reserved={self.cpu_reserved!r} must be an int >= 0, with accelerator='cpu'")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 16
                                            or self.block_size % 16):
            raise ValueError(f"app arg block_size={self.block_size!r} must be a multiple of 16 (vLLM CPU: of 32)")
        if self.model is not None and not (Path(self.model).expanduser() / "config.json").is_file():
            raise ValueError(f"app arg model={self.model!r} is not a local Hugging Face folder (no config.json)")
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ValueError(f"app arg namespace={self.namespace!r} must be a non-empty string")
        if not 0 < self.port < 65536:
            raise ValueError(f"app arg port={self.port!r} must be a TCP port")
        if not isinstance(self.engine_kwargs, dict) or "kv_transfer_config" in self.engine_kwargs:
            raise ValueError("app arg engine_kwargs must be a dict without kv_transfer_config (set kvtier=false "
                             "for an app without kvtier's connector)")
        check_tokens(self.api_tokens)
        if not isinstance(self.engine_resources, dict) or set(self.engine_resources) - set(ROLES):
            raise ValueError(f"app arg engine_resources={self.engine_resources!r} must map a role in {list(ROLES)} "
                             "to {resource: amount}")
        for role, res in self.engine_resources.items():
            if not isinstance(res, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                                    for k, v in res.items()):
                raise ValueError(f"app arg engine_resources[{role!r}]={res!r} must map resource names to amounts > 0")

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> "AppConfig":
        from kvtier.config import TierConfig, parse_size

        a = dict(args or {})
        names = {f.name for f in dataclasses.fields(cls)} | {"api_token", "tenant", "tier_config"}
        unknown = sorted(set(a) - names)
        if unknown:
            raise ValueError(f"unknown app arg(s) {unknown}; known: {sorted(names)}")
        if "tier_config" in a:  # the Helm chart mounts the tier config as a JSON file
            if "tier" in a:
                raise ValueError("app args tier and tier_config both given; pass one")
            a["tier"] = a.pop("tier_config")
        for f in dataclasses.fields(cls):
            v = a.get(f.name)
            if not isinstance(v, str):
                continue
            if f.type in ("int", "int | None") and f.name != "kv_cache_bytes":
                try:
                    a[f.name] = int(v)
                except ValueError:
                    raise ValueError(f"app arg {f.name}={v!r} is not an int") from None
            elif f.type == "bool":
                if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"app arg {f.name}={v!r} is not a boolean (true/false)")
                a[f.name] = v.lower() in ("1", "true", "yes", "on")
            elif f.type == "dict":
                try:
                    a[f.name] = json.loads(v)
                except json.JSONDecodeError:
                    if f.name != "tier":
                        raise ValueError(f"app arg {f.name}={v[:80]!r} is not a JSON object") from None
        if a.get("kv_cache_bytes") is not None:
            a["kv_cache_bytes"] = parse_size(a["kv_cache_bytes"], "kv_cache_bytes")
        tier = a.get("tier")
        if tier is None or tier == {}:
            tier = TierConfig.from_env()
        elif isinstance(tier, str):
            tier = TierConfig.from_file(tier)
        else:
            tier = TierConfig.from_any(tier)
        a["tier"] = tier.to_dict()
        a["api_tokens"] = _tokens(a.pop("api_tokens", None), a.pop("api_token", None), a.pop("tenant", None))
        return cls(**a)

    @property
    def served_name(self) -> str:
        return self.model_id or (Path(self.model).name if self.model else "SmolLM2-135M-Instruct")


def _tokens(tokens: Any, token: str | None, tenant: str | None) -> dict[str, str]:
    """token -> tenant from the args, else from $KVTIER_API_TOKENS (JSON) / $KVTIER_API_TOKEN (the driver's env)."""
    if tenant is not None and not (isinstance(tenant, str) and TENANT_RE.fullmatch(tenant)):
        raise ValueError(f"app arg tenant={tenant!r} must be up to 64 characters of letters, digits, '.', '_' or '-'")
    if tokens and token:
        raise ValueError("app args api_tokens and api_token both given; pass one")
    if not tokens and not token:
        env = os.environ.get("KVTIER_API_TOKENS")
        if env:
            try:
                tokens = json.loads(env)
            except json.JSONDecodeError:
                raise ValueError("$KVTIER_API_TOKENS is not a JSON object of token -> tenant") from None
        token = os.environ.get("KVTIER_API_TOKEN") or None
    if isinstance(tokens, str):
        tokens = json.loads(tokens)
    out = check_tokens(tokens)
    if token:
        out.update(check_tokens({token: tenant or ""}))
    return out


def kv_transfer_config(cfg: AppConfig) -> dict[str, Any]:
    """The engines' ``kv_transfer_config``: kvtier's connector, joining the tier of ``cfg``."""
    from ray_apps.tier_backend import CONNECTOR, CONNECTOR_MODULE

    extra = {**cfg.tier, "namespace": cfg.namespace}
    if cfg.address:
        extra["address"] = cfg.address
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def llm_config(cfg: AppConfig, folder: str, replicas: int, role: str = "engine") -> dict[str, Any]:
    """One Ray Serve LLM ``LLMConfig`` (as a dict) for ``replicas`` engines of ``role``."""
    engine: dict[str, Any] = {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len,
                              "enable_prefix_caching": cfg.prefix_caching,
                              "enable_prompt_tokens_details": True,  # usage.prompt_tokens_details.cached_tokens
                              "tensor_parallel_size": cfg.tensor_parallel_size}
    if cfg.accelerator == "cpu":
        # eager: CPU graphs cost start-up time and gain nothing for a 135M model; 512 MiB of fp32 KV is
        # ~11K tokens of SmolLM2 (46 KiB/token), 8 concurrent 1.4K-token requests
        engine.update(enforce_eager=True, kv_cache_memory_bytes=cfg.kv_cache_bytes or (512 << 20))
    elif cfg.kv_cache_bytes:
        engine["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
    if cfg.block_size:
        engine["block_size"] = cfg.block_size
    if cfg.kvtier:
        engine["kv_transfer_config"] = kv_transfer_config(cfg)
    engine.update(cfg.engine_kwargs)
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.served_name, "model_source": folder},
        "engine_kwargs": engine,
        "deployment_config": {"num_replicas": replicas, "max_ongoing_requests": cfg.max_ongoing_requests},
        "runtime_env": {"env_vars": engine_env(cfg)},
        "accelerator_config": {"kind": cfg.accelerator},
    }
    if cfg.accelerator_type:
        out["accelerator_type"] = cfg.accelerator_type
    if cfg.engine_resources.get(role):
        bundle = {"CPU": 1, **({"GPU": 1} if cfg.accelerator == "gpu" else {}), **cfg.engine_resources[role]}
        out["placement_group_config"] = {"bundle_per_worker": bundle}  # one bundle per tensor-parallel rank
    return out


def engine_env(cfg: AppConfig) -> dict[str, str]:
    """The engine replicas' environment (their vLLM processes inherit it)."""
    env = {k: v for k, v in ENGINE_ENV.items() if v}
    if cfg.accelerator == "cpu":
        # vLLM's CPU worker binds its OpenMP threads to all cores but the reserved ones, and reserves one more
        # whenever any kv_transfer_config is set (meant for NIXL's threads, utils/ompmultiprocessing.py); on a
        # box with no more cores than it would reserve it reserves none. On 2 cores that gave the engine with
        # kvtier 2 threads and the same engine without it 1: kvtier's arm of bench/serve.py prefilled 1.47x
        # faster on prompts it could not reuse. One explicit number for every engine keeps the arms alike
        reserved = cfg.tensor_parallel_size if cfg.cpu_reserved is None else cfg.cpu_reserved
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    return env


def build_app(args: Mapping[str, Any] | None = None):
    """The Serve application for ``args`` (see ``AppConfig``)."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.deployment import PDDecodeServer, PDPrefillServer
    from ray.serve.llm.ingress import make_fastapi_ingress

    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray_apps import ingress, tier_backend

    cfg = AppConfig.from_args(args)
    if cfg.kvtier:
        tier_backend.register()
    from kvtier.model import hf_folder

    folder = str(hf_folder(cfg.model))
    if cfg.shape == "shared":
        top = LLMConfig.model_validate(llm_config(cfg, folder, cfg.replicas))
        server = build_llm_deployment(top)
    else:
        prefill = LLMConfig.model_validate(llm_config(cfg, folder, cfg.prefill_replicas, "prefill"))
        top = LLMConfig.model_validate(llm_config(cfg, folder, cfg.decode_replicas, "decode"))
        if not cfg.kvtier:
            raise ValueError("app arg shape='pd' needs kvtier=true: decode gets prefill's KV through the tier")
        server = build_llm_deployment(top, name_prefix="Decode:", deployment_cls=PDDecodeServer, bind_kwargs={
            "prefill_server": build_llm_deployment(prefill, name_prefix="Prefill:", deployment_cls=PDPrefillServer)})
    cls = make_fastapi_ingress(ingress.KVTierIngress, endpoint_map=ingress.ENDPOINTS,
                               app=ingress.make_app(cfg.api_tokens))
    options = ingress.KVTierIngress.get_deployment_options([top])
    return serve.deployment(cls, **options).bind(
        llm_deployments={top.model_id: server}, model_cards={top.model_id: to_model_metadata(top.model_id, top)},
        namespace=cfg.namespace if cfg.kvtier else None)


# ``serve run ray_apps.serve:app [k=v ...]`` and a RayService's ``import_path: ray_apps.serve:app``
# (with ``args``) call this builder; nothing heavy is imported until it is called
app = build_app


def main(argv: list[str] | None = None) -> int:
    """``kvtier serve``: start (or join) Ray, run the app on host:port until interrupted."""
    p = argparse.ArgumentParser(prog="kvtier serve", description="Ray Serve LLM (vLLM engines) with kvtier's KV tier")
    p.add_argument("--shape", choices=SHAPES, default="shared")
    p.add_argument("--model", help="local Hugging Face model folder (default SmolLM2-135M-Instruct)")
    p.add_argument("--replicas", type=int, help="engines in the shared shape")
    p.add_argument("--prefill-replicas", type=int)
    p.add_argument("--decode-replicas", type=int)
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--tier", help="tier config: a JSON file (default $KVTIER_CONFIG or the defaults)")
    p.add_argument("--no-kvtier", action="store_true", help="the same app without kvtier's connector")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP API binds (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=8,
                   help="logical CPUs of a local Ray (engines + ingress + router; 4 left the ingress unscheduled)")
    p.add_argument("--arg", action="append", default=[], metavar="K=V", help="any other app arg (AppConfig)")
    a = p.parse_args(argv)
    args: dict[str, Any] = {"shape": a.shape, "model": a.model, "replicas": a.replicas, "tier": a.tier,
                            "prefill_replicas": a.prefill_replicas, "decode_replicas": a.decode_replicas,
                            "accelerator": a.accelerator, "host": a.host, "port": a.port,
                            "kvtier": not a.no_kvtier}
    for kv in a.arg:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"kvtier serve: --arg {kv!r} must be K=V", file=sys.stderr)
            return 2
        args[k] = v
    import ray
    from ray import serve

    ray.init(address=a.address, num_cpus=None if a.address else a.num_cpus, include_dashboard=False)
    try:
        application = build_app({k: v for k, v in args.items() if v is not None})
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"kvtier serve: {e}", file=sys.stderr)
        ray.shutdown()
        return 2
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
