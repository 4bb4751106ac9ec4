"""prompt_batch.py: cache hits, occurrence reads, concurrent ordered writes, failures, manual mode."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from openai_server import HTML_ERROR_PAGE, Fail, FakeOpenAIServer, Raw, Reply, layout_reply
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------
# Faults: bad bodies, dead endpoints, keys, pipes, interrupts, broken files (issue 12)

def test_non_json_truncated_and_html_bodies_are_per_prompt_failures(tmp_path, server):
    config = batch_config(tmp_path, prompt_type="lvd_visibility", num_prompts=40, concurrency=1)
    prompts = get_prompts("lvd_visibility")  # 10 prompts x 10 repeats
    bad = {prompts[0]: Raw("Expecting value? this is plain text", content_type="text/plain"),
           prompts[10]: Raw('{"id": "x", "choices": [{"index": 0, "message": {"content": "Frame'),
           prompts[20]: Raw(HTML_ERROR_PAGE, content_type="text/html")}
    for prompt, body in bad.items():
        server.script(prompt, *[body] * 4)  # the first occurrence fails (2 tries), the second too; then fine
    summary, output = run(config, client_factory(server, max_retries=1))
    failed = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == len(summary.failures) == 6 and summary.stopped is None
    assert [index for index, _, _ in summary.failures] == [0, 1, 10, 11, 20, 21]
    assert all("malformed response" in line and "gave up after 2 tries" in line for line in failed)
    assert "not JSON" in failed[0] and "not JSON" in failed[2] and "Bad Gateway" in failed[4]
    assert summary.new == 34  # the batch went on
    assert sum(map(len, load_cache_entries(config.cache_path).values())) == 34


@pytest.mark.parametrize("status,cause", [(401, "HTTP 401"), (404, "HTTP 404"), (400, "HTTP 400"), (403, "HTTP 403")])
def test_an_endpoint_that_rejects_every_request_stops_the_batch(tmp_path, server, status, cause):
    server.default = Fail(status, "no such thing")
    config = batch_config(tmp_path, prompt_type="lvd_visibility", concurrency=2)
    summary, output = run(config, client_factory(server, max_retries=4))
    assert summary.stopped.startswith(f"stopped: 3 prompt(s) in a row failed at {server.base_url}: {cause}")
    assert len(summary.failures) == 3 and summary.not_run == 97 and not summary.ok
    assert server.request_count <= 3 + 2 + 2  # no retries; at most the requests already in flight
    assert "not run" in summary.format()


def test_one_rejected_prompt_does_not_stop_the_batch(tmp_path, server):
    prompts = get_prompts("lvd_dynamic_spatial")
    server.script(prompts[0], Fail(400, "this one is too long"))
    summary, _ = run(batch_config(tmp_path, num_prompts=10), client_factory(server))
    assert summary.stopped is None and len(summary.failures) == 1 and summary.new == 9


def _dead_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_cli_stops_within_seconds_when_the_endpoint_is_down(tmp_path):
    # Acceptance (issue 12, item 8): 500 prompts, fresh cache, connection refused; it used to take ~35 minutes.
    url = f"http://127.0.0.1:{_dead_port()}/v1"
    command = [sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompt-type", "lvd", "--model", "m",
               "--template_version", "v0.1", "--auto-query", "--always-save", "--no-visualize", "--quiet",
               "--cache-dir", str(tmp_path / "cache"), "--llm-base-url", url, "--concurrency", "8"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    elapsed_s = time.monotonic() - started
    assert done.returncode == 2 and elapsed_s < 60, (done.returncode, elapsed_s)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stopped: 3 prompt(s) in a row failed at {url}: cannot connect: [Errno 111] Connection "
                      "refused; is the server running? Check --llm-base-url (or $OPENAI_BASE_URL), e.g. "
                      "http://localhost:8000/v1; the replies saved so far are kept, rerun the same command to resume"]
    assert "Traceback" not in done.stderr and "retrying" not in done.stderr
    assert len([line for line in done.stdout.splitlines() if line.startswith("FAILED")]) == 3
    assert "3 failed, 497 not run" in done.stdout


@pytest.mark.slow
def test_cli_never_prints_or_writes_the_api_key(tmp_path, server):
    key = "sk-proj-TopSecretKey0123456789abcdefXYZ"
    prompts = ["A red fox runs to the right", "A cat jumps", "A dog sits", "A bird flies", "A fish swims"]
    # A 5xx that echoes the key (logged as a retry warning), then a good reply; then 401s echoing it.
    server.script(prompts[0], Fail(500, "overloaded; key", echo_key=True), layout_reply(prompts[0], name="fox"))
    server.default = Fail(401, "Incorrect API key provided:", echo_key=True)
    command = [sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompts", *prompts, "--model", "m",
               "--template_version", "v0.1", "--auto-query", "--always-save", "--cache-dir", str(tmp_path / "cache"),
               "--img-dir", str(tmp_path / "img"), "--llm-base-url", server.base_url, "--llm-retry-delay", "0",
               "--concurrency", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(OPENAI_API_KEY=key), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Incorrect API key provided: [REDACTED]" in done.stdout + done.stderr  # the message is kept, the key not
    assert "overloaded; key [REDACTED]" in done.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".gif" for path in written) and any(path.suffix == ".json" for path in written)
    for text in [done.stdout, done.stderr] + [path.read_bytes().decode("latin-1") for path in written]:
        assert key not in text and "TopSecretKey" not in text


@pytest.mark.slow
def test_list_prompts_into_a_closed_pipe_exits_quietly(tmp_path):
    # `python prompt_batch.py --prompt-type lvd --list-prompts | head`: the reader goes away first.
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompt-type", "lvd",
                                "--list-prompts"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and stderr == ""


@pytest.mark.slow
def test_ctrl_c_prints_one_line(tmp_path):
    cache_dir = tmp_path / "cache"
    with FakeOpenAIServer(delay_s=0.5) as slow:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "prompt_batch.py"), "--prompt-type", "lvd",
                                    "--model", "m", "--template_version", "v0.1", "--auto-query", "--always-save",
                                    "--no-visualize", "--cache-dir", str(cache_dir), "--llm-base-url",
                                    slow.base_url], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   # a shell's background job ignores SIGINT, and children inherit that
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 90
        while not (cache_dir / "cache_lvd_v0.1_m.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.rstrip().splitlines()[-1] == ("interrupted; the replies saved so far are kept; rerun the same "
                                             "command to resume")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and out == ""
    assert load_cache_entries(cache_dir / "cache_lvd_v0.1_m.json")  # what was saved is there


@pytest.mark.parametrize("argv,message", [
    (["--skip_first_prompts", "-5"], "argument --skip_first_prompts: must be an integer >= 0, found -5"),
    (["--num_prompts", "-1"], "argument --num_prompts: must be an integer >= 1, found -1"),
    (["--num_prompts", "0"], "argument --num_prompts: must be an integer >= 1, found 0"),
    (["--num_prompts", "two"], "argument --num_prompts: must be an integer, found 'two'"),
    (["--concurrency", "0"], "argument --concurrency: must be an integer in [1, 64], found 0"),
    (["--concurrency", "65"], "argument --concurrency: must be an integer in [1, 64], found 65"),
    (["--llm-timeout", "nan"], "argument --llm-timeout: must be a finite number > 0, found nan"),
    (["--parse-attempts", "0"], "argument --parse-attempts: must be an integer in [1, 20], found 0"),
])
def test_numeric_flags_are_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        pb.main(["--prompt-type", "demo", "--model", "m", "--template_version", "v0.1", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_an_unusable_cache_folder_or_cache_file_is_one_line(tmp_path, server, capsys):
    (tmp_path / "a_file").write_text("x")
    argv = ["--prompt-type", "demo", "--model", "m", "--template_version", "v0.1", "--auto-query", "--always-save",
            "--no-visualize", "--quiet", "--llm-base-url", server.base_url]
    assert pb.main(argv + ["--cache-dir", str(tmp_path / "a_file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cache-dir" in err and "is a file, not a folder" in err
    for content in ("", "{not json", "[1, 2]", '{"p": "reply"}'):
        (tmp_path / "cache_demo_v0.1_m.json").write_text(content)
        assert pb.main(argv + ["--cache-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'cache_demo_v0.1_m.json'}: "), err
    assert server.request_count == 0


def test_the_same_shard_run_twice_at_once_saves_each_reply_once(tmp_path, server):
    jitter = random.Random(1)
    server.default = lambda caption: Reply(layout_reply(caption), delay_s=jitter.uniform(0, 0.01))
    config = batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=50)  # 10 prompts x 5
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(config, client_factory(server))[0]))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 2 and all(summary.ok for summary in results)
    entries = load_cache_entries(config.cache_path)
    assert sum(map(len, entries.values())) == 50 and all(len(v) == 5 for v in entries.values())  # not 100


def test_free_text_prompts_and_prompts_files(tmp_path, server, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# two prompts\nA cat jumps onto a sofa.\n\nA dog runs to the left\n")
    base = ["--model", "m", "--template_version", "v0.1", "--auto-query", "--always-save", "--no-visualize",
            "--quiet", "--cache-dir", str(tmp_path), "--llm-base-url", server.base_url]
    assert pb.main(["--prompts", "A cat jumps onto a sofa", "A bird sings", *base]) == 0
    assert pb.main(["--prompts-file", str(prompts_file), *base]) == 0
    entries = load_cache_entries(tmp_path / "cache_custom_v0.1_m.json")
    assert list(entries) == ["A cat jumps onto a sofa", "A bird sings", "A dog runs to the left"]
    assert server.request_count == 3  # the second list's first prompt was cached
    capsys.readouterr()
    assert pb.main(["--prompts-file", str(prompts_file), "--list-prompts"]) == 0
    assert capsys.readouterr().out.splitlines() == ["A cat jumps onto a sofa", "A dog runs to the left"]
    assert pb.main(["--prompts-file", str(tmp_path / "missing.txt"), *base]) == 2
    assert pb.main(["--prompt-type", "lvd", "--prompts", "A cat", *base]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "drop --prompt-type lvd" in err


def test_replies_stage_2_cannot_use_are_asked_again(tmp_path, server):
    prompt = get_prompts("demo")[0]
    unusable = [layout_reply(prompt, name="bear("), layout_reply(prompt).replace("[20, 200", "[1e308, 200")]
    server.script(prompt, *unusable, layout_reply(prompt, name="bear"))
    config = batch_config(tmp_path, prompt_type="demo", max_parse_attempts=3, visualize=True)
    summary, output = run(config, client_factory(server))
    assert (summary.new, summary.failures, server.request_count) == (1, [], 3)
    assert load_cache_entries(config.cache_path) == {prompt: [layout_reply(prompt, name="bear")]}
    server.script(prompt, *unusable)
    summary, output = run(batch_config(tmp_path / "b", prompt_type="demo", visualize=True), client_factory(server))
    (line,) = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert "no parsable reply in 2 attempt(s)" in line and "too far outside the canvas" in line


def test_manual_mode_stops_at_the_end_of_input(tmp_path, capsys):
    summary, output = run(batch_config(tmp_path, prompt_type="lvd_numeracy", num_prompts=3, auto_query=False), None, "")
    assert len(summary.failures) == 1 and summary.not_run == 2 and output.count("FAILED") == 1
    assert summary.stopped.startswith("end of input after prompt 0")


# --------------------------------------------------------------------------------------------
# Endpoints that never die, and counts of two processes on one shard (issue 17, items 20 and 26)

def test_an_endpoint_that_always_answers_500_stops_the_batch(tmp_path, server):
    server.default = Fail(500, "internal error")
    config = batch_config(tmp_path, prompt_type="lvd_visibility", concurrency=2)
    summary, _ = run(config, client_factory(server, max_retries=1))
    assert summary.stopped.startswith(f"stopped: 3 prompt(s) in a row failed at {server.base_url} (2 tries each): "
                                      "HTTP 500")
    assert "check it (its log, its load)" in summary.stopped
    assert len(summary.failures) == 3 and summary.not_run == 97
    assert server.request_count <= 2 * (3 + 2)  # the prompts that failed and those in flight, 2 tries each


def test_an_endpoint_that_never_answers_in_time_stops_the_batch(tmp_path, server):
    server.default = lambda caption: Reply(layout_reply(caption), delay_s=1.0)
    config = batch_config(tmp_path, prompt_type="lvd_visibility", concurrency=1)
    started = time.monotonic()
    summary, _ = run(config, client_factory(server, max_retries=0, timeout_s=0.1))
    assert summary.stopped.startswith(f"stopped: 3 prompt(s) in a row failed at {server.base_url} (1 tries each): "
                                      "request timed out")
    assert "raise --llm-timeout" in summary.stopped and summary.not_run == 97
    assert time.monotonic() - started < 10


def test_failures_for_different_reasons_do_not_stop_the_batch(tmp_path, server):
    prompts = get_prompts("lvd_dynamic_spatial")
    for prompt, status in zip(prompts[:4], (500, 502, 500, 503)):
        server.script(prompt, Fail(status, "flaky"))
    summary, _ = run(batch_config(tmp_path, num_prompts=10, concurrency=1), client_factory(server, max_retries=0))
    assert summary.stopped is None and len(summary.failures) == 4 and summary.new == 6


def test_a_reply_another_process_saved_first_is_not_counted_as_new(tmp_path, server):
    config = batch_config(tmp_path, prompt_type="custom", prompts=("A cat walks", "A dog runs"), concurrency=1)

    def saved_elsewhere_first(caption: str) -> str:  # the other process of the same shard wins the race
        LayoutCache(config.cache_path).store(caption, 0, layout_reply(caption, name="other"))
        return layout_reply(caption)

    server.default = saved_elsewhere_first
    summary, _ = run(config, client_factory(server))
    assert (summary.new, summary.hits, summary.ok) == (0, 2, True)
    assert all("other" in replies[0] for replies in load_cache_entries(config.cache_path).values())


def test_a_start_removes_the_temp_files_of_a_killed_cache_write(tmp_path, server):
    # Issue 17, item 24: kill -9 inside a cache write left .cache_<...>.tmp.json beside the cache after the resume.
    config = batch_config(tmp_path, num_prompts=2)
    run(config, client_factory(server))
    stale = config.cache_path.parent / f".{config.cache_path.stem}.x9k.tmp.json"
    stale.write_text('{"half": ')
    summary, _ = run(config, client_factory(server))
    assert summary.hits == 2 and not stale.exists()
    assert sorted(p.name for p in config.cache_path.parent.iterdir()) == [config.cache_path.name]


def test_a_new_model_name_starts_a_new_cache_without_the_published_caches_warning(tmp_path, server, caplog):
    # Issue 17, item 17: every --prompts run with a new model name printed a long warning about published caches.
    import logging

    config = batch_config(tmp_path, prompt_type="custom", prompts=("A cat walks",), model="my-new-llm")
    with caplog.at_level(logging.INFO, logger="prompt_batch"):
        summary, _ = run(config, client_factory(server))
    assert summary.new == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("new layout cache" in r.getMessage() for r in caplog.records)
