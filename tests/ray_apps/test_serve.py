"""The Serve app end to end: real local Ray, real SmolLM2, HTTP through
``requests`` and the official ``openai`` client.

One Serve instance for the module on the session's shared Ray, with its own
tier namespace (Prefill and Decode replicas, NIXL transport where it starts), codec ``none`` and 16-token chunks so that short
prompts hit, partly hit and miss the tier. Greedy output is compared with plain
``model.generate`` in this process, without any cache reuse.
"""

from __future__ import annotations

import json
import socket

import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")
serve = pytest.importorskip("ray.serve")
torch = pytest.importorskip("torch")

import kvtier  # noqa: E402
from ray_apps.serve import build_app  # noqa: E402

pytestmark = pytest.mark.ray
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
C = 16  # tokens per chunk
MAX_PROMPT = 200
NAMESPACE = "kvtier-serve-test"
APP = "kvtier-test"
DOC = ("The Python standard library contains modules for file handling, networking, text processing, "
       "dates and times, and data compression. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    tier = {"codec": "none", "chunk_tokens": C, "hot_bytes": "64MiB", "warm_bytes": "128MiB", "num_shards": 1,
            "cold_uri": str(tmp / "cold")}
    from concurrent.futures import ThreadPoolExecutor

    from kvtier.model import load_model

    # the reference model loads here while Ray and the replicas start (~10 s saved on 2 cores)
    loading = ThreadPoolExecutor(1).submit(load_model, progress=None)
    kvtier.init(namespace=NAMESPACE, config=tier)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"tier": tier, "num_cpus": 0, "namespace": NAMESPACE, "api_token": TOKEN, "torch_threads": 1,
                     "limits": {"max_prompt_tokens": MAX_PROMPT, "max_tokens_cap": 16, "default_max_tokens": 4}})
    serve.run(app, name=APP, route_prefix="/")
    model, tok = loading.result()
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "tok": tok}
    serve.shutdown()
    kvtier.shutdown(stop=True)  # this module's tier only; the session's Ray stays up


def name(server) -> str:
    return requests.get(server["url"] + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]


def post(server, path: str, body: dict, headers: dict | None = None, **kw) -> requests.Response:
    return requests.post(server["url"] + path, json=body, headers={**AUTH, **(headers or {})}, timeout=120, **kw)


def reference(server, ids: list[int], n: int, count: bool = False):
    """Plain greedy ``model.generate`` on the whole prompt, no cache reuse: the text (and token count)."""
    m, tok = server["model"], server["tok"]
    out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    text = tok.decode(out, skip_special_tokens=True)
    return (text, len(out)) if count else text


def complete(server, prompt: str, n: int = 6, **extra) -> dict:
    r = post(server, "/v1/completions", {"model": name(server), "prompt": prompt, "max_tokens": n, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_models_and_auth(server):
    assert requests.get(server["url"] + "/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(server["url"] + "/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("get", "/v1/models"), ("post", "/v1/completions"), ("get", "/kvtier/stats")):
            r = requests.request(method, server["url"] + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_greedy_output_equals_plain_generate_on_miss_hit_and_partial_hit(server):
    tok = server["tok"]
    base = DOC * 2 + "For compression, the module to import is"  # ~50 tokens: 3 full chunks reusable
    longer = base + " zlib. For dates and times, the module to import is"
    cached = []
    for prompt in (base, base, longer):  # miss, full hit, partial hit (the shared chunks)
        out = complete(server, prompt)
        ids = tok(prompt)["input_ids"]
        want, n = reference(server, ids, 6, count=True)
        assert want.strip() and out["choices"][0]["text"] == want
        assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == n
        cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
    n_base = (len(tok(base)["input_ids"]) - 1) // C * C
    assert cached[0] == 0 and cached[1] == n_base and cached[2] == n_base


def test_chat_streaming_with_the_openai_client_matches_non_streaming(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=TOKEN, max_retries=0)
    msgs = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=name(server), messages=msgs, max_tokens=8, temperature=0)
    pieces, finish, chunks = [], None, 0
    for ev in client.chat.completions.create(model=name(server), messages=msgs, max_tokens=8, temperature=0, stream=True):
        chunks += 1
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
        if ev.choices and ev.choices[0].finish_reason:
            finish = ev.choices[0].finish_reason
    assert "".join(pieces) == whole.choices[0].message.content and whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and chunks >= 3
    ids = server["tok"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    want = reference(server, list(ids), 8)
    assert whole.choices[0].message.content == want.split("<|im_end|>")[0]
    comp = client.completions.create(model=name(server), prompt="One, two,", max_tokens=4, temperature=0)
    assert comp.choices[0].text == reference(server, server["tok"]("One, two,")["input_ids"], 4)


def test_completion_stream_is_sse_ending_with_done_and_includes_usage(server):
    r = post(server, "/v1/completions", {"model": name(server), "prompt": "Once upon a time", "max_tokens": 5,
                                         "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
             stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    raw = r.content.decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(p["choices"][0]["text"] for p in payloads if p["choices"])
    assert payloads[-1]["usage"]["completion_tokens"] == 5 and payloads[-1]["choices"] == []
    assert text == complete(server, "Once upon a time", n=5)["choices"][0]["text"]


def test_stop_sequence_cuts_the_text(server):
    full = complete(server, "Count: one, two, three,", n=10)["choices"][0]
    text = full["text"]
    cut = text.find(",", 1)
    assert cut > 0, f"the model's output {text!r} has no comma to stop at"
    out = complete(server, "Count: one, two, three,", n=10, stop=[",", "zzz"])["choices"][0]
    assert out["text"] == text[:cut] and out["finish_reason"] == "stop"
    assert full["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param, in_message", [
    ({"prompt": "x"}, 400, "model", "model is required"),
    ({"model": "MODEL", "prompt": "x", "max_tokens": 17}, 400, "max_tokens", "max_tokens_cap=16"),
    ({"model": "MODEL", "prompt": "x", "temperature": -1}, 400, "temperature", "temperature=-1"),
    ({"model": "MODEL", "prompt": "word " * 400}, 400, "prompt", f"max_prompt_tokens={MAX_PROMPT}"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "not served"),
    ({"model": "MODEL", "prompt": ["a"] * 9}, 400, "prompt", "max_batch=8"),
])
def test_malformed_requests_get_4xx_json_naming_the_field(server, body, status, param, in_message):
    body = {k: (name(server) if v == "MODEL" else v) for k, v in body.items()}
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and in_message in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_body_level_errors(server):
    url = server["url"] + "/v1/chat/completions"
    r = requests.post(url, data=b"{nope", headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = requests.post(url, data=b"x" * ((1 << 20) + 1), headers=AUTH, timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"model": name(server), "messages": [{"role": "user", "content": "hi"}]},
             headers={"X-KVTier-Tenant": "bad tenant!"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-KVTier-Tenant"
    r = requests.get(server["url"] + "/v1/nothing", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_tenants_do_not_share_blocks_and_stats_show_hits(server):
    prompt = "Tenant isolation test. " + DOC * 2
    body = {"model": name(server), "prompt": prompt, "max_tokens": 2, "temperature": 0}
    a1 = post(server, "/v1/completions", body, headers={"X-KVTier-Tenant": "team-a"}).json()
    b1 = post(server, "/v1/completions", body, headers={"X-KVTier-Tenant": "team-b"}).json()
    a2 = post(server, "/v1/completions", body, headers={"X-KVTier-Tenant": "team-a"}).json()
    cached = [x["usage"]["prompt_tokens_details"]["cached_tokens"] for x in (a1, b1, a2)]
    assert cached[0] == 0 and cached[1] == 0 and cached[2] > 0  # b never reads a's blocks
    assert a1["choices"][0]["text"] == b1["choices"][0]["text"] == a2["choices"][0]["text"]
    stats = requests.get(server["url"] + "/kvtier/stats", headers=AUTH, timeout=60).json()
    assert stats["ingress"]["cached_tokens"] >= cached[2]
    assert stats["prefill"]["tier_hit_tokens"] > 0 and stats["prefill"]["put_chunks"] > 0
    tier = stats["prefill"]["tier"]
    assert tier["hot"]["hits"] + tier["warm"].get("hits", 0) > 0


def test_random_requests_get_json_answers_and_the_server_stays_up(server):
    """Issue 6: malformed requests never crash the server or return data; each gets a JSON 4xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    model = name(server)
    values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
                          | st.text(max_size=30) | st.just(model),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                          max_leaves=8)
    bodies = st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "stop",
                                              "stream", "n", "top_p", "seed", "stream_options"]), values, max_size=6)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           raw=st.one_of(st.binary(max_size=64), bodies.map(lambda b: json.dumps(b).encode())))
    def check(path, raw):
        r = requests.post(server["url"] + path, data=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=120)
        if r.status_code == 200:  # only a valid request gets here; it must be a real answer
            assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))
        else:
            assert 400 <= r.status_code < 500, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert requests.get(server["url"] + "/health", timeout=30).status_code == 200



def test_decode_recomputes_when_the_prefill_worker_died_mid_transfer(server):
    """Issue 6: the prefill replica dies after handing off; its blocks are gone
    from the tier too. The decode worker must recompute and still answer right."""
    prompt = "Recompute after a failure. " + DOC * 2
    sampling = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}
    prefill = serve.get_deployment_handle("Prefill", app_name=APP)
    decode = serve.get_deployment_handle("Decode", app_name=APP)
    handoff = prefill.prefill.remote({"prompt": prompt}, "", sampling).result(timeout_s=120)
    assert handoff["n_full"] > handoff["n_hit"] == 0 and handoff["desc"] is not None
    kvtier.delete(handoff["keys"])  # nothing in the tier to fall back on
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"{APP}#Prefill" in actor["name"]:  # SERVE_REPLICA::kvtier-test#Prefill#<id>
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    events = list(decode.options(stream=True).generate.remote({"prompt": prompt}, "", sampling, handoff))
    text = "".join(e["text"] for e in events)
    assert text == reference(server, handoff["ids"], 4)
    last = events[-1]["kvtier"]
    assert last["recomputed_chunks"] == handoff["n_full"] and last["handed_off_chunks"] == 0
