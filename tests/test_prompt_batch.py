"""prompt_batch.py: cache hits, occurrence reads, concurrent ordered writes, failures, manual mode."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

from openai_server import Fail, FakeOpenAIServer, Reply, layout_reply
from prompt import get_prompts
from utils.cache import LayoutCache, load_cache_entries
from utils.llm import LLMClient, LLMConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = REPO_ROOT.parent / "shared" / "reference" / "lvd-caches"


def _load_prompt_batch():
    """The CLI module by path, so the tests do not depend on the repo root being on sys.path."""
    if "prompt_batch" in sys.modules:
        return sys.modules["prompt_batch"]
    spec = importlib.util.spec_from_file_location("prompt_batch", REPO_ROOT / "prompt_batch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prompt_batch"] = module
    spec.loader.exec_module(module)
    return module


pb = _load_prompt_batch()


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def client_factory(server: FakeOpenAIServer, **overrides):
    settings = dict(model="test-model", base_url=server.base_url, max_retries=1, retry_base_delay_s=0.001,
                    timeout_s=5.0)
    settings.update(overrides)
    return lambda: LLMClient(LLMConfig(**settings), api_key="k")


def batch_config(tmp_path, **overrides) -> "pb.BatchConfig":
    settings = dict(model="test-model", prompt_type="lvd_dynamic_spatial", template_version="v0.1",
                    cache_dir=tmp_path / "cache", auto_query=True, always_save=True, visualize=False,
                    concurrency=4, parse_retry_delay_s=0.0, img_root=tmp_path / "img")
    settings.update(overrides)
    return pb.BatchConfig(**settings)


def run(config, factory=None, stdin: str = ""):
    output = io.StringIO()
    summary = pb.run_batch(config, factory, input_stream=io.StringIO(stdin), output=output, show_progress=False)
    return summary, output.getvalue()


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra)
    return env


def test_list_prompts_prints_the_list_with_repeats(capsys):
    assert pb.main(["--prompt-type", "lvd", "--list-prompts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == get_prompts("lvd") and len(lines) == 500
    assert lines[0] == lines[4] == "A realistic lively video of a scene with one moving car"
    published = PUBLISHED / "cache_lvd_v0.1_gpt-4-1106-preview.json"
    if published.is_file():  # order of first appearance and multiplicities equal the published cache
        entries = json.loads(published.read_text())
        assert list(dict.fromkeys(lines)) == list(entries)
        assert all(lines.count(prompt) == len(replies) for prompt, replies in entries.items())


def test_cli_second_run_hits_the_cache_and_sends_nothing(tmp_path, server):
    command = [sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompt-type", "demo", "--model", "m",
               "--template_version", "v0.1", "--auto-query", "--always-save", "--no-visualize", "--quiet",
               "--cache-dir", str(tmp_path), "--llm-base-url", server.base_url]
    first = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "1 new, 0 failed" in first.stdout and server.request_count == 1
    cache_file = tmp_path / "cache_demo_v0.1_m.json"
    saved = cache_file.read_bytes()
    assert load_cache_entries(cache_file) == {get_prompts("demo")[0]: [layout_reply(get_prompts("demo")[0])]}
    second = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "1 from the cache, 0 new" in second.stdout
    assert server.request_count == 1 and cache_file.read_bytes() == saved


def test_concurrent_run_writes_the_cache_of_a_sequential_run(tmp_path, server):
    jitter = random.Random(0)
    # Replies depend on the caption only; random delays make them arrive out of order.
    server.default = lambda caption: Reply(layout_reply(caption, step_px=len(caption) % 50),
                                           delay_s=jitter.uniform(0, 0.02))
    sequential, _ = run(batch_config(tmp_path / "seq", concurrency=1), client_factory(server))
    assert server.max_in_flight == 1
    concurrent, _ = run(batch_config(tmp_path / "par", concurrency=8), client_factory(server))
    assert server.max_in_flight > 1
    assert sequential.new == concurrent.new == 100 and server.request_count == 200
    files = [batch_config(tmp_path / name).cache_path for name in ("seq", "par")]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_hits_read_by_occurrence_and_misses_fill_up(tmp_path, server):
    config = batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=5)  # one prompt, 5 times
    prompt = get_prompts("lvd_numeracy")[0]
    cached = [layout_reply(prompt, name="car", step_px=10), layout_reply(prompt, name="car", step_px=20)]
    LayoutCache.load(config.cache_path).extend([(prompt, text) for text in cached])
    summary, _ = run(config, client_factory(server))
    assert (summary.hits, summary.new, summary.failures) == (2, 3, [])
    assert server.request_count == 3
    replies = load_cache_entries(config.cache_path)[prompt]
    assert replies[:2] == cached and len(replies) == 5
    # A shard over occurrences 2..4 now hits only: no request, nothing written.
    before = config.cache_path.read_bytes()
    shard, _ = run(batch_config(tmp_path, prompt_type="lvd_numeracy", skip_first_prompts=2, num_prompts=3),
                   client_factory(server))
    assert (shard.hits, shard.new) == (3, 0) and server.request_count == 3
    assert config.cache_path.read_bytes() == before


def test_a_malformed_reply_is_asked_again(tmp_path, server):
    config = batch_config(tmp_path, prompt_type="demo")
    prompt = get_prompts("demo")[0]
    server.script(prompt, "Frame 1: [{'id': 0, 'name': 'bear', 'box': [0, 0", layout_reply(prompt))
    summary, output = run(config, client_factory(server))
    assert (summary.new, summary.failures) == (1, []) and server.request_count == 2
    assert load_cache_entries(config.cache_path) == {prompt: [layout_reply(prompt)]}
    assert "FAILED" not in output


def test_failures_are_reported_in_one_line_and_the_batch_goes_on(tmp_path, server):
    config = batch_config(tmp_path, skip_first_prompts=48, num_prompts=4)  # end of a 5x run, then singles
    prompts = get_prompts("lvd_dynamic_spatial")[48:52]
    unparsable, refused = prompts[2], prompts[3]
    server.script(unparsable, "no layout here", "still no layout")
    server.script(refused, Fail(500, "server down"), Fail(500, "server down"))
    summary, output = run(config, client_factory(server, max_retries=1))
    assert summary.new == 2 and [f[0] for f in summary.failures] == [50, 51]
    failed_lines = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert len(failed_lines) == 2
    assert unparsable in failed_lines[0] and "no parsable reply in 2 attempt(s)" in failed_lines[0]
    assert refused in failed_lines[1] and "HTTP 500" in failed_lines[1] and "server down" in failed_lines[1]
    entries = load_cache_entries(config.cache_path)
    assert unparsable not in entries and refused not in entries  # nothing unparsable or failed is saved
    assert sum(len(v) for v in entries.values()) == 2
    assert not summary.ok and "2 failed" in summary.format()


def test_cli_exits_non_zero_when_something_failed(tmp_path, server, capsys, monkeypatch):
    server.default = Fail(500)
    argv = ["--prompt-type", "demo", "--model", "m", "--template_version", "v0.1", "--auto-query", "--always-save",
            "--no-visualize", "--quiet", "--cache-dir", str(tmp_path), "--llm-base-url", server.base_url,
            "--llm-max-retries", "0"]
    assert pb.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAILED prompt 0" in out and "0 new, 1 failed" in out


def test_no_key_for_openai_is_a_clear_error_only_when_a_query_is_needed(tmp_path, capsys, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--prompt-type", "demo", "--model", "gpt-4-1106-preview", "--template_version", "v0.1",
            "--auto-query", "--always-save", "--no-visualize", "--quiet", "--cache-dir", str(tmp_path)]
    assert pb.main(argv) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    prompt = get_prompts("demo")[0]
    LayoutCache.load(tmp_path / "cache_demo_v0.1_gpt-4-1106-preview.json").append(prompt, layout_reply(prompt))
    assert pb.main(argv) == 0  # a complete cache needs no key


def test_manual_mode_reads_a_piped_reply(tmp_path):
    config = batch_config(tmp_path, prompt_type="demo", auto_query=False)
    prompt = get_prompts("demo")[0]
    stdin = "\n" + layout_reply(prompt) + "\n\nignored trailing text\n"
    summary, output = run(config, None, stdin)
    assert (summary.new, summary.failures) == (1, [])
    assert "[system]" in output and f"Caption: {prompt}" in output  # the chat to paste
    assert load_cache_entries(config.cache_path) == {prompt: [layout_reply(prompt)]}


def test_manual_mode_without_input_fails_cleanly(tmp_path):
    summary, output = run(batch_config(tmp_path, prompt_type="demo", auto_query=False), None, "")
    assert summary.new == 0 and len(summary.failures) == 1
    assert "end of input" in output and not batch_config(tmp_path).cache_path.exists()


def test_save_question_requeries_on_any_answer_but_y(tmp_path, server):
    config = batch_config(tmp_path, prompt_type="demo", always_save=False)
    prompt = get_prompts("demo")[0]
    first, second = layout_reply(prompt, step_px=10), layout_reply(prompt, step_px=20)
    server.script(prompt, first, second)
    summary, output = run(config, client_factory(server), stdin="n\ny\n")
    assert output.count("Save (y/n)?") == 2 and server.request_count == 2
    assert summary.new == 1 and load_cache_entries(config.cache_path) == {prompt: [second]}
    # End of input at the question: nothing saved, not a failure.
    summary, _ = run(batch_config(tmp_path / "eof", prompt_type="demo", always_save=False),
                     client_factory(server), stdin="")
    assert (summary.new, summary.not_saved, summary.ok) == (0, 1, True)


def test_box_gifs_for_new_replies_and_optionally_for_hits(tmp_path, server, monkeypatch):
    drawn = []

    def save_layout_gif(layout, path, num_frames=24):
        drawn.append((layout.prompt, Path(path).name))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"GIF89a" + str(len(drawn)).encode())

    monkeypatch.setitem(sys.modules, "utils.visualize", types.SimpleNamespace(save_layout_gif=save_layout_gif))
    config = batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=2, visualize=True)
    run(config, client_factory(server))
    assert [name for _, name in drawn] == ["boxes_0.gif", "boxes_1.gif"]
    img_dir = tmp_path / "img" / "imgs_lvd_numeracy_templatev0.1"
    assert (img_dir / "boxes.gif").read_bytes() == (img_dir / "boxes_1.gif").read_bytes()
    run(config, client_factory(server))  # all hits: not drawn by default
    assert len(drawn) == 2
    run(batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=2, visualize_cache_hit=True),
        client_factory(server))
    assert len(drawn) == 4


def test_a_missing_drawing_module_warns_once_and_the_batch_goes_on(tmp_path, server, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "utils.visualize", None)  # import raises ImportError
    summary, _ = run(batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=3, visualize=True),
                     client_factory(server))
    assert summary.new == 3
    assert sum("layout GIFs are off" in r.getMessage() for r in caplog.records) == 1


def test_model_and_template_are_required_unless_listing(capsys):
    with pytest.raises(SystemExit):
        pb.main(["--prompt-type", "demo", "--auto-query"])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pb.main(["--list-prompts", "--concurrency", "0"])
