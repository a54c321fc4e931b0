"""The Serve app, prefill/decode shape, end to end: Ray Serve LLM's P/D graph
(ingress -> decode -> prefill) over two vLLM engines with kvtier's connector.

Prefill runs each request with ``max_tokens=1`` and saves the prompt's chunks to
the tier in the background; its ``kv_transfer_params`` tell decode how many, and
decode's connector holds the request (bounded) until the tier has them, then
loads them instead of computing them, which vLLM reports as ``cached_tokens``
(its own prefix cache is off on both sides). No test waits for the saves itself:
that decode finds them at once is what is tested.
That the loaded KV gives the recomputed text is the connector's test
(tests/kvtier/vllm); here codec ``none`` and greedy decoding must give the same
text for the same prompt whichever keys (salts) carried its KV.
"""

from __future__ import annotations

import shutil
import socket
import tempfile

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

pytestmark = pytest.mark.ray
TOKEN = "token-pd-test-789"
CHUNK = 64
NAMESPACE = "kvtier-pd-test"
DOC = ("Disaggregated serving runs the prompt on one engine and the generation on another. The key-value "
       "cache moves between them, here through the tier. ")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from ray_apps.serve import build_app

    assert not ray.is_initialized(), "this module starts its own Ray (8 logical CPUs for 2 engines + ingress)"
    tmp = tempfile.mkdtemp(prefix="kvtpd", dir="/tmp")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tier = {"codec": "none", "chunk_tokens": CHUNK, "hot_bytes": "64MiB", "warm_bytes": "256MiB", "num_shards": 1,
            "cold_uri": str(tmp_path_factory.mktemp("cold"))}
    app = build_app({"shape": "pd", "prefix_caching": False, "block_size": 32, "max_model_len": 2048,
                     "kv_cache_bytes": "128MiB", "tier": tier, "namespace": NAMESPACE, "api_token": TOKEN})
    serve.run(app, name="kvtier-pd-test", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=180)


def test_decode_loads_the_prompts_kv_from_the_tier(app_url):
    c = client(app_url)
    model = c.models.list().data[0].id
    prompt = "Prefill then decode. " + DOC * 10  # ~320 tokens: 4 full chunks
    first = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    n = first.usage.prompt_tokens
    assert n > 4 * CHUNK and first.choices[0].text
    # decode waited for prefill's saves (a fresh prompt: nothing else had stored it)
    assert first.usage.prompt_tokens_details.cached_tokens == (n - 1) // CHUNK * CHUNK
    again = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    # decode computed only the tail: every full chunk but the last prompt token's came from the tier
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // CHUNK * CHUNK
    assert again.choices[0].text == first.choices[0].text
    st = requests.get(app_url + "/kvtier/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()
    # the blocks sit in the shared warm tier (reads may come from each engine's own hot tier: not counted here)
    assert st["warm"]["blocks"] >= (n - 1) // CHUNK and st["warm"]["bytes"] > 0


def test_a_fresh_prompts_decode_finds_what_prefill_just_saved(app_url):
    c = client(app_url)
    model = c.models.list().data[0].id
    r = c.completions.create(model=model, prompt="A fresh prompt. " + DOC * 10, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1) // CHUNK * CHUNK


def test_pd_streaming_chat_gives_the_same_text_under_fresh_keys(app_url):
    c = client(app_url)
    model = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "Summarize: " + DOC * 8}]
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
