"""Security: no code-executing deserializer anywhere, tenants never share blocks,
the HTTP API binds where it is told, and S3 credentials never leak.

* A scan of every ``.py`` in kvtier/, kernels/ and ray_apps/ (by AST, so that
  ``model.eval()`` is not ``eval(...)``) for pickle and its relatives, ``torch.load``,
  ``np.load(allow_pickle=True)``, ``eval``/``exec``, unsafe ``yaml`` loads and
  ``trust_remote_code=True``. Blocks travel and rest as Arrow IPC, HTTP bodies
  are JSON; anything found must be in ``ALLOWED`` with a reason. The scanner
  itself is tested on snippets, so an empty result means something.
* Tenant isolation through the public API: two clients of one tier with
  different ``TierConfig.tenant`` and the same keys (the same tokens) never see
  each other's blocks, in the warm or the cold tier. Over HTTP (the
  ``X-KVTier-Tenant`` header) it is proven with the real model in
  tests/ray_apps/test_serve.py::test_tenants_do_not_share_blocks_and_stats_show_hits.
* ``kvtier serve`` hands the configured host to Ray Serve (loopback by default);
  the bearer token is enforced over live HTTP in tests/ray_apps/test_serve.py.
* A tier with S3 credentials in its environment, its S3 server stopped under it:
  the secret appears in no log record of this process, in no stats, in no
  error message, and in no log file of the Ray session (shards and controller).
"""

from __future__ import annotations

import ast
import json
import logging
import uuid
from pathlib import Path

import pytest

import kvtier
from kvtier.runtime import api
from rayfixture import REPO_DIR
from tierkit import keys_of, kv_of, one_block_bytes, same, tier, wait_for

SCANNED = ("kvtier", "kernels", "ray_apps")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "jsonpickle"}
# calls that execute code or unpickle whatever their arguments (np.load and yaml.load are checked by argument)
BANNED_CALLS = {"eval", "exec", "torch.load", "ray.cloudpickle.loads", "ray.cloudpickle.load", "pd.read_pickle",
                "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load"}
# file (relative), finding -> why it is safe. Empty today: nothing in the scanned packages needs one.
ALLOWED: dict[tuple[str, str], str] = {}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def scan_source(source: str) -> list[str]:
    """Every banned import or call in ``source``, as short descriptions."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[-1] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[-1] in BANNED_MODULES or any(a.name in BANNED_MODULES for a in node.names):
                found.append(f"from {mod} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("np.load", "numpy.load"):
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    found.append(f"{name}(allow_pickle=...)")
            elif name == "yaml.load":
                loader = _dotted(kw["Loader"]) if "Loader" in kw else (_dotted(node.args[1]) if len(node.args) > 1 else "")
                if loader.split(".")[-1] not in ("SafeLoader", "CSafeLoader"):
                    found.append("yaml.load without SafeLoader")
            elif name in BANNED_CALLS:
                found.append(f"{name}()")
            v = kw.get("trust_remote_code")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                found.append(f"{name or 'call'}(trust_remote_code=...)")
    return found


@pytest.mark.parametrize("snippet, finding", [
    ("import pickle", "import pickle"),
    ("import ray.cloudpickle as cp", "import ray.cloudpickle"),
    ("from ray import cloudpickle", "from ray import cloudpickle"),
    ("import dill, marshal", "import dill"),
    ("from shelve import open", "from shelve import open"),
    ("x = torch.load(path)", "torch.load()"),
    ("x = np.load(p, allow_pickle=True)", "np.load(allow_pickle=...)"),
    ("x = eval(s)", "eval()"),
    ("exec(code)", "exec()"),
    ("yaml.load(f)", "yaml.load without SafeLoader"),
    ("yaml.load(f, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", "AutoModel.from_pretrained(trust_remote_code=...)"),
])
def test_the_scanner_finds_each_pattern(snippet, finding):
    assert finding in scan_source(snippet)


@pytest.mark.parametrize("snippet", [
    "model.eval()", "np.load(p)", "np.load(p, allow_pickle=False)", "yaml.load(f, Loader=yaml.SafeLoader)",
    "yaml.safe_load(f)", "json.loads(s)", "pa.ipc.open_stream(buf)", "from_pretrained(p, trust_remote_code=False)",
])
def test_the_scanner_passes_safe_calls(snippet):
    assert scan_source(snippet) == []


def test_no_code_executing_deserializer_in_kvtier_kernels_ray_apps():
    files = sorted(p for d in SCANNED for p in Path(REPO_DIR, d).rglob("*.py"))
    assert len(files) > 20, f"scanned only {len(files)} files: wrong root {REPO_DIR}?"
    found = {(str(p.relative_to(REPO_DIR)), f) for p in files for f in scan_source(p.read_text())}
    assert found - set(ALLOWED) == set(), f"code-executing deserializers outside the allow-list: {sorted(found - set(ALLOWED))}"
    assert set(ALLOWED) - found == set(), f"stale allow-list entries: {sorted(set(ALLOWED) - found)}"


# ---------------------------------------------------------------- tenants
def as_tenant(namespace: str, tenant: str) -> None:
    """This process's client of the running tier, speaking for ``tenant``."""
    kvtier.shutdown()  # closes the client only: the tier is shared (not embedded)
    kvtier.init(namespace=namespace, config=dict(codec="none", hot_bytes=0, tenant=tenant))


def test_tenant_key_binds_the_tenant_and_is_a_valid_key():
    from kvtier.keys import check_keys, tenant_key

    k = keys_of("tk", 2)
    d = [tenant_key(x, "") for x in k]
    a, b = [tenant_key(x, "team-a") for x in k], [tenant_key(x, "team-b") for x in k]
    assert len(set(a + b + k + d)) == 8 and check_keys(a + b + d) == a + b + d
    # issue 9 item 4: the default tenant is hashed too, so it cannot name team-b's stored keys
    assert not set(tenant_key(x, "") for x in b) & set(b), "the default tenant reaches no tenant's blocks"
    assert all(len(x) == 40 and int(x, 16) >= 0 for x in a)
    assert tenant_key("x" * 200, "t" * 64) != tenant_key("x" * 200, "t" * 63)


def test_tenants_never_read_each_others_blocks(cluster, tmp_path):
    one = one_block_bytes()
    with tier(num_shards=1, warm_bytes=2 * one, cold_uri=str(tmp_path)) as info:
        ns = info["namespace"]
        k = keys_of("tenant", 4)  # the same tokens, the same keys, for every tenant
        a = [kv_of("tenant-a", i) for i in range(4)]
        b = [kv_of("tenant-b", i) for i in range(4)]
        as_tenant(ns, "team-a")
        kvtier.put(k, a)  # 2 stay warm, 2 are demoted to the cold tier
        wait_for(lambda: kvtier.stats()["cold"]["blocks"] == 2, what="two of team-a's blocks in the cold tier")
        assert kvtier.lookup(k) == 4

        for other in ("team-b", ""):
            as_tenant(ns, other)
            assert kvtier.lookup(k) == 0 and not any(kvtier.contains(key) for key in k)
            assert kvtier.get(k) == [None] * 4, f"tenant {other!r} read team-a's blocks"
            assert kvtier.delete(k) == 0, f"tenant {other!r} deleted team-a's blocks"
        as_tenant(ns, "team-b")
        kvtier.put(k, b)
        assert all(same(x, y) for x, y in zip(kvtier.get(k), b))

        as_tenant(ns, "team-a")
        got = kvtier.get(k)  # warm and cold hits: still team-a's own bytes
        assert all(same(x, y) for x, y in zip(got, a)), "team-b's puts under the same keys reached team-a"
        st = kvtier.stats()
        assert st["keys"] >= 8, "one entry per tenant and key"
        names = {p.name[:-4].split("~")[0] for p in tmp_path.rglob("*.kvb")}
        assert names and not names & set(k), "cold objects are named by tenant-bound keys, not the shared ones"


# ---------------------------------------------------------------- HTTP binding
def test_kvtier_serve_binds_the_configured_host(monkeypatch):
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    import ray_apps.serve as serve_mod

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(serve, "start", lambda **kw: seen.setdefault("start", kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: seen.setdefault("run", kw))
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # Ray Serve LLM's builder reads the connected Ray's runtime env: with ray.init faked, build nothing
    monkeypatch.setattr(serve_mod, "build_app", lambda args: ("app", args))

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_mod.time, "sleep", interrupt)
    assert serve_mod.main([]) == 0
    assert seen["start"]["http_options"] == {"host": "127.0.0.1", "port": 8000}, "loopback unless told otherwise"
    seen.clear()
    assert serve_mod.main(["--host", "10.1.2.3", "--port", "9001"]) == 0
    assert seen["start"]["http_options"] == {"host": "10.1.2.3", "port": 9001}


# ---------------------------------------------------------------- S3 credentials
def test_s3_credentials_appear_in_no_log_stats_or_error(cluster, caplog):
    import ray

    s3 = cluster["s3"]
    secret, access = s3.secret_key, s3.access_key
    caplog.set_level(logging.DEBUG)
    one = one_block_bytes()
    uri = f"s3://kvtier-sec/{uuid.uuid4().hex[:10]}"
    texts: list[str] = []
    with tier(num_shards=1, warm_bytes=2 * one, cold_uri=uri, s3_endpoint=s3.endpoint, rpc_timeout_s=2.0) as info:
        client = api._get_client()
        k = keys_of("secret", 8)
        kvtier.put(k[:4], [kv_of("secret", i) for i in range(4)])  # 2 demoted to S3 by the shard
        wait_for(lambda: kvtier.stats()["cold"]["blocks"] == 2, what="two blocks on S3")
        texts.append(json.dumps(kvtier.stats(), default=str))
        s3.stop()
        try:
            client.cfg = client.cfg.replace(write_through=True)
            kvtier.put(k[4:8], [kv_of("secret", i) for i in range(4, 8)])  # write-through and demotions fail
            client.cfg = client.cfg.replace(write_through=False)
            assert kvtier.get(k[:2]) == [None, None], "S3 down: the cold blocks are misses"
            with pytest.raises(kvtier.TierUnavailableError) as e:
                client.cold.put(k[0], kvtier.compress(kv_of("secret", 0), "none", key=k[0]))
            texts.append(str(e.value))
            st = wait_for(lambda: (s := kvtier.stats())["cold"]["write_failures"] >= 1 and s, what="failed demotions")
            texts.append(json.dumps(st, default=str))
            assert st["client"]["errors"] >= 1 and st["cold"]["client_errors"] >= 1
        finally:
            s3.start()
        texts.append(json.dumps(api._describe(client), default=str))
        texts.append(repr(client.cold) + repr(client.cfg))
    texts += [r.getMessage() for r in caplog.records]
    assert any("is unavailable" in t for t in texts), "the S3 failure was reported somewhere (else this proves nothing)"
    for t in texts:
        assert secret not in t and access not in t, t[:500]

    # the shards and the controller log in their own processes: every file of this Ray session
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files, f"no Ray log files under {logs}"
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaked == [], f"the S3 secret appears in {leaked}"
    reported = [p.name for p in files if b"is unavailable" in p.read_bytes()]
    assert reported, "a shard logged the failed S3 writes (else the scan proves nothing)"
