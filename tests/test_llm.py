"""The LLM client against a real local HTTP server speaking chat completions (no mocks of openai)."""
from __future__ import annotations

import dataclasses
import socket

import pytest

from openai_server import Fail, FakeOpenAIServer, Reply, layout_reply
from utils.llm import (PLACEHOLDER_API_KEY, LayoutQueryError, LLMClient, LLMConfig, LLMConfigError, LLMRequestError,
                       build_client, compute_retry_delay_s, query_layout, resolve_api_key, resolve_base_url,
                       resolve_model_name)

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
    with pytest.raises(LLMRequestError, match=r"not retryable.*HTTP 401") as info:
        make_client(server).complete(MESSAGES)
    assert info.value.attempts == 1 and server.request_count == 1


def test_a_timeout_is_retried(server):
    server.script(CAPTION, Reply("too late", delay_s=1.0), "in time")
    assert make_client(server, timeout_s=0.2).complete(MESSAGES) == "in time"
    assert server.request_count == 2


def test_connection_errors_are_retried_then_raise():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = LLMConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2,
                       retry_base_delay_s=0.001, timeout_s=2.0)
    sleeps = []
    with pytest.raises(LLMRequestError, match="connection error") as info:
        LLMClient(config, "k", sleep=sleeps.append).complete(MESSAGES)
    assert info.value.attempts == 3 and len(sleeps) == 2


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
    with pytest.raises(LLMConfigError, match="retry"):
        LLMConfig(model="m", max_retries=-1)
    with pytest.raises(LLMConfigError, match="empty"):
        LLMConfig(model="")
