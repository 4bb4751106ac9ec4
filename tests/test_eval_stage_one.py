"""scripts/eval_stage_one.py: the paper's stage-1 numbers, occurrence reads in shards, misses."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openai_server import FakeOpenAIServer, layout_reply
from prompt import get_benchmark, get_prompts
from utils.cache import LayoutCache, load_cache_entries

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = REPO_ROOT.parent / "shared" / "reference" / "lvd-caches"
needs_published = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="needs the published caches in ../shared")
# (cache file, per-task correct counts out of 100) from the paper's README (spec, verification notes).
PAPER_SCORES = {
    "cache_lvd_v0.1_gpt-4-1106-preview.json": {"numeracy": 100, "attribution": 100, "visibility": 100,
                                               "dynamic_spatial": 100, "sequential": 88},
    "cache_lvd_v0.1_gpt-3.5-turbo.json": {"numeracy": 100, "attribution": 100, "visibility": 100,
                                          "dynamic_spatial": 73, "sequential": 15},
}


def _load_eval_module():
    spec = importlib.util.spec_from_file_location("eval_stage_one", REPO_ROOT / "scripts" / "eval_stage_one.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("eval_stage_one", module)
    spec.loader.exec_module(module)
    return module


ev = _load_eval_module()


def reply_with_objects(num_objects: int, name: str = "car") -> str:
    """A v0.1 reply with ``num_objects`` objects that stay put in all six frames."""
    objects = ", ".join(f"{{'id': {i}, 'name': '{name}', 'box': [{20 + 120 * i}, 200, 100, 100]}}"
                        for i in range(num_objects))
    frames = "\n".join(f"Frame {k}: [{objects}]" for k in range(1, 7))
    return f"Reasoning: still.\n\n{frames}\nBackground keyword: road"


@pytest.fixture
def tiny_cache(tmp_path) -> Path:
    """lvd_numeracy's first 10 entries: "one moving car" x5 and "one lively cat" x5.

    The car's replies 0-1 show one car (pass) and 2-4 two cars (fail); the cat's all pass.
    """
    prompts = get_prompts("lvd_numeracy")[:10]
    assert len(set(prompts[:5])) == 1 and len(set(prompts[5:])) == 1
    car = [reply_with_objects(1)] * 2 + [reply_with_objects(2)] * 3
    cat = [reply_with_objects(1, "cat")] * 5
    path = tmp_path / "cache_lvd_numeracy_v0.1_m.json"
    LayoutCache.load(path).extend([(prompts[0], r) for r in car] + [(prompts[5], r) for r in cat])
    return path


def evaluate(path: Path, prompt_type: str, window: range, query=None):
    return ev.evaluate_stage_one(get_benchmark(prompt_type), LayoutCache.load(path), window, query,
                                 output=io.StringIO())


def test_tiny_cache_scores_and_shards_read_their_occurrence(tiny_cache):
    full = evaluate(tiny_cache, "lvd_numeracy", range(0, 10))
    assert full.tally.to_dict()["overall"] == {"correct": 7, "total": 10}
    assert [r["success"] for r in full.records] == [True, True, False, False, False] + [True] * 5
    # A shard starting mid-repeat reads occurrences 2..4 (the failing replies), as a full run does.
    shard = evaluate(tiny_cache, "lvd_numeracy", range(2, 5))
    assert shard.tally.to_dict()["overall"] == {"correct": 0, "total": 3}
    assert shard.records == full.records[2:5]


def test_missing_replies_without_a_way_to_query_count_as_failures(tiny_cache, tmp_path, capsys, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    json_out = tmp_path / "scores.json"
    argv = ["--prompt-type", "lvd_numeracy", "--model", "gpt-4", "--template_version", "v0.1",
            "--num_prompts", "12", "--cache-path", str(tiny_cache), "--json-out", str(json_out), "--verbose"]
    assert ev.main(argv) == 1
    out = capsys.readouterr().out
    unscored_lines = [line for line in out.splitlines() if line.startswith("NOT SCORED")]
    assert len(unscored_lines) == 2 and "no way to query" in unscored_lines[0] and "OPENAI_API_KEY" in out
    assert "Eval success (numeracy): False" in out and "Eval success (numeracy): True" in out
    scores = json.loads(json_out.read_text())
    assert scores["tasks"] == {"numeracy": {"correct": 7, "total": 12}}
    assert scores["overall"] == {"correct": 7, "total": 12}
    assert [u["index"] for u in scores["unscored"]] == [10, 11]
    assert scores["config"]["cache_path"] == str(tiny_cache)


def test_a_miss_is_queried_saved_and_scored(tiny_cache, capsys):
    with FakeOpenAIServer(default=lambda caption: layout_reply(caption, name="bird")) as server:
        argv = ["--prompt-type", "lvd_numeracy", "--model", "local-model", "--template_version", "v0.1",
                "--num_prompts", "12", "--cache-path", str(tiny_cache), "--llm-base-url", server.base_url,
                "--show-cache-access"]
        assert ev.main(argv) == 0
        assert server.request_count == 2
    out = capsys.readouterr().out
    assert "Number of keys accessed: 3" in out
    assert "overall 9 12 75.00" in " ".join(out.split())
    bird = get_prompts("lvd_numeracy")[10]
    assert load_cache_entries(tiny_cache)[bird] == [layout_reply(bird, name="bird")] * 2


@needs_published
@pytest.mark.parametrize("name", sorted(PAPER_SCORES))
def test_published_caches_give_the_paper_numbers_also_in_shards(name):
    path = PUBLISHED / name
    full = evaluate(path, "lvd", range(500))
    scores = full.tally.to_dict()
    assert {task: v["correct"] for task, v in scores["tasks"].items()} == PAPER_SCORES[name]
    assert scores["overall"] == {"correct": sum(PAPER_SCORES[name].values()), "total": 500}
    shards = [evaluate(path, "lvd", window) for window in (range(0, 137), range(137, 333), range(333, 500))]
    assert [r for shard in shards for r in shard.records] == full.records


@needs_published
def test_cli_acceptance_command(tmp_path):
    json_out = tmp_path / "gpt4.json"
    cache_file = PUBLISHED / "cache_lvd_v0.1_gpt-4-1106-preview.json"
    command = [sys.executable, "scripts/eval_stage_one.py", "--prompt-type", "lvd", "--template_version", "v0.1",
               "--model", "gpt-4-1106-preview", "--cache-path", str(cache_file), "--json-out", str(json_out)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no API key anywhere
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = " ".join(done.stdout.split())
    assert "dynamic_spatial 100 100 100.00 sequential 88 100 88.00 overall 488 500 97.60" in table
    assert json.loads(json_out.read_text())["overall"] == {"correct": 488, "total": 500}
