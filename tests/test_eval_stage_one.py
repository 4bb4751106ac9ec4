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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------
# Missing and broken caches, flags, dead endpoints, pipes (issue 12)

def test_a_missing_cache_file_is_one_line_naming_the_path_and_the_flag(tmp_path, capsys):
    argv = ["--prompt-type", "lvd", "--model", "gpt-4-1106-preview", "--template_version", "v0.1",
            "--cache-dir", str(tmp_path)]
    assert ev.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert str(tmp_path / "cache_lvd_v0.1_gpt-4-1106-preview.json") in captured.err
    assert "--cache-dir" in captured.err and "github.com/TonyLianLong/LLM-groundedVideoDiffusion" in captured.err
    assert "NOT SCORED" not in captured.err
    assert ev.main(argv[:-2] + ["--cache-path", str(tmp_path / "nope.json")]) == 2
    assert "(--cache-path)" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "{", "[]", '{"p": 1}'])
def test_a_broken_cache_file_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "cache.json"
    path.write_text(content)
    assert ev.main(["--model", "m", "--template_version", "v0.1", "--cache-path", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ")


@pytest.mark.parametrize("argv,message", [
    (["--skip_first_prompts", "-5"], "argument --skip_first_prompts: must be an integer >= 0, found -5"),
    (["--num_prompts", "0"], "argument --num_prompts: must be an integer >= 1, found 0"),
    (["--num_prompts", "-1"], "argument --num_prompts: must be an integer >= 1, found -1"),
    (["--llm-max-tokens", "0"], "argument --llm-max-tokens: must be an integer >= 1, found 0"),
    (["--prompt-type", "demo"], "argument --prompt-type: invalid choice: 'demo'"),
])
def test_numeric_flags_are_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        ev.main(["--model", "m", "--template_version", "v0.1", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_json_out_folder_is_one_line(tiny_cache, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    argv = ["--prompt-type", "lvd_numeracy", "--model", "m", "--template_version", "v0.1", "--num_prompts", "10",
            "--cache-path", str(tiny_cache), "--json-out", str(tmp_path / "a_file" / "scores.json")]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json-out" in err and "is a file, not a folder" in err


def test_many_unscored_prompts_are_summed_up(tiny_cache, tmp_path, capsys, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    json_out = tmp_path / "scores.json"
    argv = ["--prompt-type", "lvd", "--model", "gpt-4", "--template_version", "v0.1", "--cache-path",
            str(tiny_cache), "--json-out", str(json_out)]
    assert ev.main(argv) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("NOT SCORED")]
    assert len(lines) == 11 and lines[-1] == "NOT SCORED: 480 more prompt(s), not listed (all are in --json-out)"
    assert len(json.loads(json_out.read_text())["unscored"]) == 490


def test_a_dead_endpoint_stops_querying_after_a_few_prompts(tiny_cache, capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--prompt-type", "lvd_numeracy", "--model", "m", "--template_version", "v0.1", "--cache-path",
            str(tiny_cache), "--llm-base-url", f"http://127.0.0.1:{port}/v1"]
    assert ev.main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("querying stopped: 3 prompt(s) in a row failed") == 1 and "cannot connect" in out
    assert "overall 7 100 7.00" in " ".join(out.split())


def test_queried_replies_are_saved_once_per_occurrence_and_checked_for_stage_2(tiny_cache):
    prompts = get_prompts("lvd_numeracy")
    bird = prompts[10]
    with FakeOpenAIServer(default=lambda caption: layout_reply(caption, name="bird")) as server:
        server.script(bird, layout_reply(bird, name="bird("))  # stage 2 could not locate this name
        from utils.llm import LLMClient, LLMConfig

        query = ev.build_query("v0.1", lambda: LLMClient(LLMConfig(model="m", base_url=server.base_url), "k"),
                               max_parse_attempts=2, parse_retry_delay_s=0)
        cache = LayoutCache.load(tiny_cache)
        first = ev.evaluate_stage_one(get_benchmark("lvd_numeracy"), cache, range(10, 12), query,
                                      output=io.StringIO())
        again = ev.evaluate_stage_one(get_benchmark("lvd_numeracy"), LayoutCache.load(tiny_cache), range(10, 12),
                                      query, output=io.StringIO())
        assert server.request_count == 3  # 2 for the first occurrence (one unusable), 1 for the second
    assert first.records == again.records and not first.unscored
    assert load_cache_entries(tiny_cache)[bird] == [layout_reply(bird, name="bird")] * 2


@pytest.mark.slow
def test_cli_output_into_a_closed_pipe_exits_quietly(tiny_cache, tmp_path):
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "eval_stage_one.py"), "--prompt-type",
                                "lvd_numeracy", "--model", "m", "--template_version", "v0.1", "--num_prompts", "10",
                                "--cache-path", str(tiny_cache), "--verbose"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and stderr == ""
