"""The LLM client against a real local HTTP server speaking chat completions (no mocks of openai)."""
from __future__ import annotations

import argparse
import dataclasses
import socket

import pytest

from openai_server import HTML_ERROR_PAGE, Fail, FakeOpenAIServer, Raw, Reply, layout_reply
from utils.llm import (PLACEHOLDER_API_KEY, EndpointFailureGuard, LayoutQueryError, LLMClient, LLMConfig,
                       LLMConfigError, LLMEndpointError, LLMRequestError, add_llm_arguments, build_client,
                       compute_retry_delay_s, query_layout, resolve_api_key, resolve_base_url, resolve_model_name)

MESSAGES = [{"role": "system", "content": "plan boxes"}, {"role": "user", "content": "Caption: a bear walks"}]
CAPTION = "a bear walks"


def make_client(server: FakeOpenAIServer, sleeps: list | None = None, **overrides) -> LLMClient:
    settings = dict(model="test-model", base_url=server.base_url, retry_base_delay_s=0.001,
                    retry_max_delay_s=0.004, max_retries=3, timeout_s=5.0)
    settings.update(overrides)
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return LLMClient(LLMConfig(**settings), api_key="test-key", sleep=sleep)


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


def test_success_sends_the_reference_request(server):
    server.script(CAPTION, "the reply")
    assert make_client(server).complete(MESSAGES) == "the reply"
    (body,) = server.requests
    assert body["model"] == "test-model" and body["messages"] == MESSAGES
    assert body["temperature"] == 0.25 and body["max_tokens"] == 900  # spec 2.1
    assert "stop" not in body


def test_rate_limit_then_success_backs_off(server):
    server.script(CAPTION, Fail(429, "slow down"), Fail(503), "finally")
    sleeps = []
    assert make_client(server, sleeps).complete(MESSAGES) == "finally"
    assert server.request_count == 3
    assert sleeps == [0.001, 0.002]


def test_permanent_failure_raises_after_bounded_tries(server):
    server.default = Fail(500, "boom")
    sleeps = []
    with pytest.raises(LLMRequestError, match=r"gave up after 4 tries.*HTTP 500.*boom") as info:
        make_client(server, sleeps).complete(MESSAGES)
    assert info.value.attempts == 4 and info.value.status == 500
    assert server.request_count == 4
    assert sleeps == [0.001, 0.002, 0.004]  # capped at retry_max_delay_s


def test_client_errors_are_not_retried(server):
    server.script(CAPTION, Fail(401, "bad key"))
    with pytest.raises(LLMRequestError, match=r"not retried.*HTTP 401") as info:
        make_client(server).complete(MESSAGES)
    assert info.value.attempts == 1 and server.request_count == 1


@pytest.mark.parametrize("status,kind,hint", [(401, "auth", "OPENAI_API_KEY"), (403, "auth", "API key"),
                                              (404, "not_found", "--model"), (400, "rejected", "--model"),
                                              (422, "rejected", "--llm-max-tokens")])
def test_endpoint_errors_are_classified_with_a_hint_and_not_retried(server, status, kind, hint):
    server.default = Fail(status, "no")
    with pytest.raises(LLMRequestError) as info:
        make_client(server).complete(MESSAGES)
    error = info.value
    assert (error.kind, error.status, error.attempts, error.endpoint_error) == (kind, status, 1, True)
    assert hint in error.hint and error.endpoint == server.base_url and f"HTTP {status}" in error.cause
    assert server.request_count == 1


@pytest.mark.parametrize("answer,problem", [
    (Raw("this is not json", content_type="text/plain"), "not JSON"),
    (Raw('{"id": "x", "choices": [{"index": 0, "mess'), "not JSON"),
    (Raw(HTML_ERROR_PAGE, content_type="text/html"), "Bad Gateway"),
    (Raw("[1, 2]"), "expected a JSON object"),
    (Raw('{"choices": []}'), "no choices"),
    (Raw('{"choices": [{"message": {"content": 7}}]}'), "not text"),
])
def test_a_body_that_is_not_a_chat_completion_is_retried_then_reported(server, answer, problem):
    # Seen from proxies and overloaded servers: 200 with HTML, truncated JSON, plain text.
    server.script(CAPTION, answer, "the reply")
    assert make_client(server).complete(MESSAGES) == "the reply"
    server.default = answer
    with pytest.raises(LLMRequestError, match="malformed response") as info:
        make_client(server, max_retries=2).complete(MESSAGES)
    assert problem in str(info.value) and info.value.kind == "transient" and info.value.attempts == 3
    assert not info.value.endpoint_error and "\n" not in str(info.value)


def test_an_empty_message_content_is_an_empty_reply(server):
    server.default = Raw('{"choices": [{"message": {"role": "assistant", "content": null}}]}')
    assert make_client(server).complete(MESSAGES) == ""


def test_the_key_is_redacted_from_errors_and_logs(server, caplog):
    key = "sk-proj-SECRETSECRET0123456789abcdef"
    server.script(CAPTION, Fail(500, "boom, your key is", echo_key=True), Fail(401, "Incorrect API key provided:",
                                                                              echo_key=True))
    client = LLMClient(LLMConfig(model="m", base_url=server.base_url, max_retries=3, retry_base_delay_s=0.001),
                       api_key=key)
    with caplog.at_level("DEBUG"), pytest.raises(LLMRequestError) as info:
        client.complete(MESSAGES)
    assert "Incorrect API key provided: [REDACTED]" in str(info.value)
    texts = [str(info.value), info.value.cause, caplog.text]
    assert all(key not in text and "SECRETSECRET" not in text for text in texts)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # the raw answer is not chained
    assert client.redact(f"x {key} y") == "x [REDACTED] y"


def test_a_timeout_is_retried(server):
    server.script(CAPTION, Reply("too late", delay_s=1.0), "in time")
    assert make_client(server, timeout_s=0.2).complete(MESSAGES) == "in time"
    assert server.request_count == 2


def _dead_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_endpoint_is_not_retried():
    # Connection refused used to cost 5 tries with backoff per prompt (35 minutes for 500 prompts).
    config = LLMConfig(model="m", base_url=f"http://127.0.0.1:{_dead_port()}/v1", max_retries=2,
                       retry_base_delay_s=0.001, timeout_s=2.0)
    sleeps = []
    with pytest.raises(LLMRequestError, match="cannot connect") as info:
        LLMClient(config, "k", sleep=sleeps.append).complete(MESSAGES)
    assert info.value.attempts == 1 and sleeps == [] and info.value.kind == "unreachable"
    assert "--llm-base-url" in info.value.hint


def test_an_empty_body_is_retried(server):
    server.script(CAPTION, Raw("", status=200), "ok")
    assert make_client(server).complete(MESSAGES) == "ok"


def test_a_closed_client_stops_waiting_and_sends_nothing(server):
    client = LLMClient(LLMConfig(model="m", base_url=server.base_url), api_key="k")
    client.close()
    with pytest.raises(LLMRequestError) as info:
        client.complete(MESSAGES)
    assert info.value.kind == "cancelled" and server.request_count == 0


def test_endpoint_failure_guard_counts_a_streak():
    endpoint_error = LLMRequestError("x", attempts=1, kind="unreachable", cause="cannot connect",
                                     hint="check --llm-base-url", endpoint="http://h/v1")
    guard = EndpointFailureGuard(max_consecutive=3)
    guard.record(endpoint_error)
    guard.record(endpoint_error)
    guard.record(None)  # a reply came: the endpoint works
    guard.record(LLMRequestError("x", attempts=5, kind="transient"))
    guard.record(endpoint_error)
    guard.record(endpoint_error)
    with pytest.raises(LLMEndpointError) as info:
        guard.record(endpoint_error)
    assert str(info.value) == ("stopped: 3 prompt(s) in a row failed at http://h/v1: cannot connect; "
                               "check --llm-base-url")
    with pytest.raises(ValueError):
        EndpointFailureGuard(0)


def test_backoff_doubles_and_is_capped():
    config = LLMConfig(model="m", retry_base_delay_s=1.0, retry_max_delay_s=5.0)
    assert [compute_retry_delay_s(config, n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_query_layout_retries_a_malformed_reply(server):
    good = layout_reply(CAPTION)
    server.script(CAPTION, "Sorry, I cannot draw boxes.", good)
    sleeps = []
    reply = query_layout(make_client(server), MESSAGES, CAPTION, parse_retry_delay_s=0.5, sleep=sleeps.append)
    assert reply.text == good and reply.attempts == 2 and sleeps == [0.5]
    assert reply.layout.phrases == ("object",) and reply.layout.background == "street"
    assert server.request_count == 2


def test_query_layout_gives_up_after_the_attempts(server):
    server.default = "Frame 1: [{'id': 0, 'name': 'bear', 'box': [0, 0, 10, 10]}]"  # incomplete
    with pytest.raises(LayoutQueryError, match=r"no parsable reply in 3 attempt\(s\).*Frame 2") as info:
        query_layout(make_client(server), MESSAGES, CAPTION, max_parse_attempts=3, sleep=lambda s: None)
    assert len(info.value.errors) == 3 and info.value.prompt == CAPTION
    assert server.request_count == 3


def test_model_aliases():
    assert resolve_model_name("gpt-3.5") == "gpt-3.5-turbo"
    assert resolve_model_name("vicuna") == "vicuna-13b"
    assert resolve_model_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_base_url_from_flag_then_environment():
    env = {"OPENAI_BASE_URL": "http://env:1/v1/"}
    assert resolve_base_url("http://flag:2/v1", env) == "http://flag:2/v1"
    assert resolve_base_url(None, env) == "http://env:1/v1"
    assert resolve_base_url(None, {}) is None


def test_api_key_sources_and_placeholder(tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-from-file\n")
    assert resolve_api_key(None, key_file, {"OPENAI_API_KEY": "sk-env"}) == "sk-from-file"
    assert resolve_api_key(None, None, {"OPENAI_API_KEY": "sk-env"}) == "sk-env"
    assert resolve_api_key(None, None, {"OPENAI_API_KEY_FILE": str(key_file)}) == "sk-from-file"
    assert resolve_api_key("http://localhost:8000/v1", None, {}) == PLACEHOLDER_API_KEY
    with pytest.raises(LLMConfigError, match="OPENAI_API_KEY.*--llm-base-url"):
        resolve_api_key(None, None, {})
    with pytest.raises(LLMConfigError, match="no API key"):
        resolve_api_key("https://api.openai.com/v1", None, {})
    with pytest.raises(LLMConfigError, match="cannot read"):
        resolve_api_key(None, tmp_path / "missing.txt", {})
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LLMConfigError, match="is empty"):
        resolve_api_key(None, tmp_path / "empty.txt", {})


def test_a_local_server_needs_no_key(server):
    client = build_client(LLMConfig(model="local", base_url=server.base_url), env={})
    server.script(CAPTION, "hi")
    assert client.complete(MESSAGES) == "hi"


def test_config_is_frozen_and_checked():
    config = LLMConfig(model="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"
    assert config.to_dict()["temperature"] == 0.25
    with pytest.raises(LLMConfigError, match="max_retries"):
        LLMConfig(model="m", max_retries=-1)
    with pytest.raises(LLMConfigError, match="timeout_s"):
        LLMConfig(model="m", timeout_s=float("nan"))
    with pytest.raises(LLMConfigError, match="temperature"):
        LLMConfig(model="m", temperature=-1)
    with pytest.raises(LLMConfigError, match="empty"):
        LLMConfig(model="")


@pytest.mark.parametrize("argv,flag,allowed", [
    (["--llm-temperature", "-1"], "--llm-temperature", "in [0, 2]"),
    (["--llm-temperature", "nan"], "--llm-temperature", "in [0, 2]"),
    (["--llm-max-tokens", "0"], "--llm-max-tokens", ">= 1"),
    (["--llm-timeout", "0"], "--llm-timeout", "> 0"),
    (["--llm-timeout", "inf"], "--llm-timeout", "> 0"),
    (["--llm-max-retries", "-1"], "--llm-max-retries", "in [0, 50]"),
    (["--llm-max-retries", "1000000"], "--llm-max-retries", "in [0, 50]"),
    (["--llm-retry-delay", "-0.5"], "--llm-retry-delay", ">= 0"),
    (["--llm-retry-max-delay", "nan"], "--llm-retry-max-delay", ">= 0"),
    (["--llm-max-endpoint-failures", "0"], "--llm-max-endpoint-failures", ">= 1"),
    (["--parse-attempts", "0"], "--parse-attempts", "in [1, 20]"),
    (["--parse-retry-delay", "-1"], "--parse-retry-delay", ">= 0"),
])
def test_llm_flags_are_checked_at_parse_time(argv, flag, allowed, capsys):
    parser = argparse.ArgumentParser()
    add_llm_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}:" in err and allowed in err and argv[1] in err
    defaults = parser.parse_args([])
    assert (defaults.llm_temperature, defaults.llm_max_tokens, defaults.parse_attempts) == (0.25, 900, 2)
