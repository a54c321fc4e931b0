"""The Serve app end to end, both shapes on one real local Ray: the shared-tier shape
(two vLLM engines, SmolLM2-135M on CPU, with kvtier's connector) and the
prefill/decode shape (Ray Serve LLM's P/D graph, ingress -> decode -> prefill),
HTTP through the ``openai`` client and ``requests``.

The two apps share one Ray and one Serve (each app in its own module cost a Ray
and Serve start-up more) and run one at a time, each under its own route prefix,
tokens and tier namespace: the shared shape's tests first, then the P/D app
replaces it (four engines at once were too much for the 2-core, 23 GiB box).
vLLM's own prefix cache is off, so every ``cached_tokens`` here came from the
tier. 32-token blocks and 64-token chunks let ~400-token prompts hit; codec
``none`` so a hit's text must equal a miss's text exactly.

Shared shape: each engine takes one request at a time (``max_ongoing_requests=1``):
two requests in flight together run on both replicas, which is how the sharing
test knows a replica read what the other wrote.

P/D shape: prefill runs each request with ``max_tokens=1`` and saves the prompt's
chunks to the tier; its ``kv_transfer_params`` tell decode how many, and decode's
connector holds the request (bounded) until the tier has them, then loads them
instead of computing them, which vLLM reports as ``cached_tokens``. No test waits
for the saves itself: that decode finds them at once is what is tested. That the
loaded KV gives the recomputed text is the connector's test (tests/vllm); here
greedy decoding must give the same text for the same prompt whichever keys
(salts) carried its KV.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

pytestmark = pytest.mark.ray
TOKEN_A, TOKEN_B = "token-team-a-123", "token-team-b-456"
PD_TOKEN = "token-pd-test-789"
CHUNK = 64
NAMESPACE, PD_NAMESPACE = "kvtier-serve-test", "kvtier-pd-test"
DOC = ("The Python standard library contains modules for file handling, networking, text processing, "
       "dates and times, and data compression. Each module documents its functions and classes. ")
PD_DOC = ("Disaggregated serving runs the prompt on one engine and the generation on another. The key-value "
          "cache moves between them, here through the tier. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Apps:
    """One app at a time on the module's Ray and Serve: asking for the other deletes this one first (four
    engines at once on the 2-core, 23 GiB box got Ray's memory monitor to kill workers, the tier's among them)."""

    def __init__(self, base: str, tmp_path_factory) -> None:
        self.base, self.tmp_path_factory, self.running = base, tmp_path_factory, None

    def url(self, shape: str) -> str:
        if self.running != shape:
            from ray_apps.serve import build_app

            if self.running is not None:
                from kvtier.runtime.api import stop_tier

                serve.delete(NAMES[self.running])  # waits until its replicas (and engines) are gone
                stop_tier(NAMESPACES[self.running])  # its tier's actors outlive the app
            self.running = None
            tier = {"codec": "none", "chunk_tokens": CHUNK, "hot_bytes": "64MiB", "warm_bytes": "256MiB",
                    "num_shards": 1, "cold_uri": str(self.tmp_path_factory.mktemp(f"cold-{shape}"))}
            # cpu_reserved 0: each engine's OpenMP threads on both cores (what vLLM gives an engine with a
            # connector on 2 cores anyway); the requests here are short, the start-ups are the module's time
            args = {"prefix_caching": False, "block_size": 32, "max_model_len": 2048, "kv_cache_bytes": "128MiB",
                    "cpu_reserved": 0, "tier": tier}
            if shape == "shared":
                args.update(replicas=2, max_ongoing_requests=1, namespace=NAMESPACE,
                            api_tokens={TOKEN_A: "team-a", TOKEN_B: "team-b"})
            else:
                args.update(shape="pd", namespace=PD_NAMESPACE, api_token=PD_TOKEN)
            t0 = time.monotonic()
            serve.run(build_app(args), name=NAMES[shape], route_prefix=f"/{shape}")
            print(f"app {shape} started in {time.monotonic() - t0:.0f} s")
            self.running = shape
        return f"{self.base}/{shape}"


NAMES = {"shared": "kvtier-test", "pd": "kvtier-pd-test"}
NAMESPACES = {"shared": NAMESPACE, "pd": PD_NAMESPACE}


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    assert not ray.is_initialized(), "this module starts its own Ray (8 logical CPUs for 2 engines + ingress)"
    tmp = tempfile.mkdtemp(prefix="kvtsrv", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield Apps(f"http://127.0.0.1:{port}", tmp_path_factory)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def app_url(apps):
    return apps.url("shared")


@pytest.fixture
def pd_url(apps):
    return apps.url("pd")


def client(url: str, token: str = TOKEN_A) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=180)


def model_of(url: str) -> str:
    return client(url).models.list().data[0].id


def complete(url: str, prompt: str, token: str = TOKEN_A, n: int = 4):
    return client(url, token).completions.create(model=model_of(url), prompt=prompt, max_tokens=n, temperature=0)


def cached(resp) -> int:
    return resp.usage.prompt_tokens_details.cached_tokens


def test_health_models_and_the_token(app_url):
    r = requests.get(app_url + "/health", timeout=30)  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert model_of(app_url) == "SmolLM2-135M-Instruct"
    for headers in ({}, {"Authorization": "Bearer wrong-token-000"}, {"Authorization": TOKEN_A}):
        for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("get", "/kvtier/stats")):
            r = requests.request(method, app_url + path, headers=headers, json={"prompt": "x"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        client(app_url, "not-a-token-1234").completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=1)


def test_completions_chat_and_streaming_with_the_openai_client(app_url):
    c = client(app_url)
    comp = complete(app_url, "One, two, three,", n=5)
    assert comp.choices[0].text and comp.usage.completion_tokens == 5 and comp.usage.prompt_tokens > 0
    msgs = [{"role": "user", "content": "Name three colors."}]
    whole = c.chat.completions.create(model=model_of(app_url), messages=msgs, max_tokens=8, temperature=0)
    pieces, usage = [], None
    for ev in c.chat.completions.create(model=model_of(app_url), messages=msgs, max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
        if ev.usage is not None:
            usage = ev.usage
    assert whole.choices[0].message.content and "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("body, status", [
    ({"model": "MODEL", "prompt": "x", "max_tokens": -3}, 400),
    ({"model": "MODEL", "prompt": "x", "temperature": "hot"}, 400),
    ({"model": "gpt-4", "prompt": "x"}, 404),
    ({"model": "MODEL"}, 400),
])
def test_bad_requests_get_4xx_with_a_json_error(app_url, body, status):
    body = {k: (model_of(app_url) if v == "MODEL" else v) for k, v in body.items()}
    r = requests.post(app_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN_A}"},
                      timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"], r.text


def test_a_tenant_header_must_match_the_token(app_url):
    r = requests.post(app_url + "/v1/completions", json={"model": model_of(app_url), "prompt": "x", "max_tokens": 1},
                      headers={"Authorization": f"Bearer {TOKEN_A}", "X-KVTier-Tenant": "team-b"}, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_mismatch"
    r = requests.post(app_url + "/v1/completions", json={"model": model_of(app_url), "prompt": "x", "max_tokens": 1},
                      headers={"Authorization": f"Bearer {TOKEN_A}", "X-KVTier-Tenant": "team-a"}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_repeated_long_prompt_is_reported_cached_with_the_same_text(app_url):
    prompt = "Repeated prompt. " + DOC * 12  # ~420 tokens: 6 full chunks
    before = warm_blocks(app_url)
    first = complete(app_url, prompt)
    n = first.usage.prompt_tokens
    assert n > 5 * CHUNK and cached(first) == 0
    # the repeat may go to the other replica, which sees the chunks once a shard holds them (the save is
    # asynchronous: it failed once here when the repeat came first)
    wait_stored(app_url, before + (n - 1) // CHUNK)
    second = complete(app_url, prompt)
    # every full chunk but the one holding the last prompt token (vLLM computes at least one token)
    assert cached(second) == (n - 1) // CHUNK * CHUNK
    assert second.choices[0].text == first.choices[0].text


def warm_blocks(app_url) -> int:
    r = requests.get(app_url + "/kvtier/stats", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["warm"]["blocks"]


def wait_stored(app_url, blocks: int, timeout_s: float = 60.0) -> None:
    """Until the tier's warm shards hold ``blocks`` blocks (bounded; the assertions after it say what is missing)."""
    deadline = time.monotonic() + timeout_s
    while warm_blocks(app_url) < blocks and time.monotonic() < deadline:
        time.sleep(0.2)


def test_two_replicas_share_a_prefix_through_the_tier(app_url):
    prompt = "Shared across replicas. " + DOC * 12
    before = warm_blocks(app_url)
    first = complete(app_url, prompt, n=1)  # computed on one replica, saved to the tier
    assert cached(first) == 0
    want = (first.usage.prompt_tokens - 1) // CHUNK * CHUNK
    # the save is asynchronous (the engine's save thread, then the client's store queue): another replica's
    # lookup sees the chunks once a shard holds them, so wait for that, bounded
    wait_stored(app_url, before + want // CHUNK)
    # two in flight at once: one per replica (each takes one request at a time), so one of them runs
    # on the replica that never saw this prompt, and both must find it in the tier
    with ThreadPoolExecutor(2) as ex:
        both = list(ex.map(lambda _: complete(app_url, prompt, n=24), range(2)))
    assert [cached(r) for r in both] == [want, want]
    assert both[0].choices[0].text == both[1].choices[0].text


def test_tenants_never_share_cached_blocks(app_url):
    prompt = "Tenant isolation. " + DOC * 8
    before = warm_blocks(app_url)
    a1 = complete(app_url, prompt, TOKEN_A)
    chunks = (a1.usage.prompt_tokens - 1) // CHUNK
    wait_stored(app_url, before + chunks)  # team-a's chunks are in the tier: b1's miss is isolation, not timing
    b1 = complete(app_url, prompt, TOKEN_B)
    wait_stored(app_url, before + 2 * chunks)
    b2 = complete(app_url, prompt, TOKEN_B)
    assert cached(a1) == 0 and cached(b1) == 0, "team-b found team-a's prompt cached"
    assert cached(b2) > 0 and a1.choices[0].text == b1.choices[0].text == b2.choices[0].text


def test_kvtier_stats_show_the_hits(app_url):
    r = requests.get(app_url + "/kvtier/stats", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=60)
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["namespace"] == NAMESPACE
    assert st["warm"]["blocks"] > 0 and st["warm"]["bytes"] > 0
    assert st["hot"]["hits"] + st["warm"]["hits"] + st["cold"]["hits"] > 0
    json.dumps(st)


# ---- the prefill/decode shape ---------------------------------------------------
def pd_client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=PD_TOKEN, max_retries=0, timeout=180)


def test_decode_loads_the_prompts_kv_from_the_tier(pd_url):
    c = pd_client(pd_url)
    model = c.models.list().data[0].id
    prompt = "Prefill then decode. " + PD_DOC * 10  # ~320 tokens: 4 full chunks
    first = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 4 * CHUNK and first.choices[0].text
    # decode waited for prefill's saves (a fresh prompt: nothing else had stored it)
    assert first.usage.prompt_tokens_details.cached_tokens == (n - 1) // CHUNK * CHUNK
    again = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    # decode computed only the tail: every full chunk but the last prompt token's came from the tier
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // CHUNK * CHUNK
    assert again.choices[0].text == first.choices[0].text
    st = requests.get(pd_url + "/kvtier/stats", headers={"Authorization": f"Bearer {PD_TOKEN}"}, timeout=60).json()
    # the blocks sit in the shared warm tier (reads may come from each engine's own hot tier: not counted here)
    assert st["warm"]["blocks"] >= (n - 1) // CHUNK and st["warm"]["bytes"] > 0


def test_a_fresh_prompts_decode_finds_what_prefill_just_saved(pd_url):
    c = pd_client(pd_url)
    model = c.models.list().data[0].id
    r = c.completions.create(model=model, prompt="A fresh prompt. " + PD_DOC * 10, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1) // CHUNK * CHUNK


def test_pd_streaming_chat_gives_the_same_text_under_fresh_keys(pd_url):
    c = pd_client(pd_url)
    model = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "Summarize: " + PD_DOC * 8}]
    c.chat.completions.create(model=model, messages=msgs, max_tokens=2, temperature=0)  # stores the prompt's KV
    pieces, usage = [], None
    for ev in c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
        if ev.usage is not None:
            usage = ev.usage
    assert pieces and usage is not None and usage.prompt_tokens_details.cached_tokens > 0
    # the client's own cache_salt gives keys nothing has stored: prefill computes and saves under them,
    # decode loads them again; the text must not depend on which copy decode read
    again = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0,
                                      extra_body={"cache_salt": "fresh-salt-1"})
    assert again.choices[0].message.content == "".join(pieces)
