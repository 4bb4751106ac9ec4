"""Stage-1 LLM client: chat completions from OpenAI or any OpenAI-compatible server.

The request follows reference spec 2.1 (chat messages, ``temperature`` 0.25, ``max_tokens`` 900,
no stop string). Differences from the reference, none of which changes a reply:

- The key comes from ``OPENAI_API_KEY``, a key file (``--llm-api-key-file`` or
  ``OPENAI_API_KEY_FILE``) or, for a local server, a placeholder; the reference read a git-ignored
  Python module only.
- The base URL comes from ``--llm-base-url`` or ``OPENAI_BASE_URL``, so vLLM, Ollama or
  llama.cpp serve any model name through the same chat endpoint.
- Failures are classified (:func:`classify_request_error`). Transient ones (429, 5xx, timeouts, a
  dropped connection, a body that is not a chat completion: not JSON, truncated JSON, HTML) are
  retried with bounded exponential backoff. Endpoint errors (the server cannot be reached, 401/403,
  404, 400 and other 4xx) fail every request alike, so they are not retried; a batch stops after a
  few of them in a row (:class:`EndpointFailureGuard`). The last failure raises
  :class:`LLMRequestError` for the batch to record, instead of ``exit()``.
- The client knows its API key and removes it (and any ``sk-...`` token) from every message it
  raises or logs: servers echo keys in their errors ("Incorrect API key provided: sk-...").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

from utils.cli import float_in, int_in
from utils.layout import LayoutError, SceneLayout, parse_layout
from utils.redact import redact_secrets

logger = logging.getLogger(__name__)

# Short names the reference accepts (spec 1.2); every other name is passed on unchanged.
MODEL_ALIASES = {"gpt-3.5": "gpt-3.5-turbo", "vicuna": "vicuna-13b"}
OPENAI_HOST = "api.openai.com"
OPENAI_BASE_URL = f"https://{OPENAI_HOST}/v1"
# Local servers (vLLM, Ollama, llama.cpp) ignore the key, but the openai client needs some string.
PLACEHOLDER_API_KEY = "no-key-needed"
API_KEY_ENV = "OPENAI_API_KEY"
API_KEY_FILE_ENV = "OPENAI_API_KEY_FILE"
BASE_URL_ENV = "OPENAI_BASE_URL"
# HTTP statuses worth another try: timeout, conflict, rate limit; 5xx are added below.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Upper bounds of the command-line settings (far above any sensible value; they keep backoff finite).
MAX_RETRIES_LIMIT = 50
MAX_PARSE_ATTEMPTS_LIMIT = 20
# A batch stops after this many prompts in a row fail with an endpoint error (see EndpointFailureGuard).
DEFAULT_MAX_ENDPOINT_FAILURES = 3
BODY_SNIPPET_CHARS = 120

# Kinds of request failure (LLMRequestError.kind). Only "transient" is retried.
TRANSIENT = "transient"      # 429, 5xx, timeout, dropped connection, malformed body
UNREACHABLE = "unreachable"  # connection refused, unknown host
AUTH = "auth"                # 401, 403: key missing, wrong or without access
NOT_FOUND = "not_found"      # 404: unknown model, or a base URL without /v1
REJECTED = "rejected"        # 400 and other 4xx: the server refuses the request itself
CANCELLED = "cancelled"      # the client was closed (the batch stopped)
ENDPOINT_KINDS = frozenset({UNREACHABLE, AUTH, NOT_FOUND, REJECTED})

Messages = Sequence[Mapping[str, str]]


class LLMError(RuntimeError):
    """Base class of the LLM client's errors."""


class LLMConfigError(LLMError):
    """The client cannot be built (no API key for OpenAI, unreadable key file, bad setting)."""


class LLMRequestError(LLMError):
    """A chat request failed for good: not retryable, or still failing after the last try.

    ``kind`` is one of the kinds above; ``endpoint_error`` is True for the kinds that say the endpoint
    (URL, key, model) is unusable, not that this one request was unlucky. ``cause`` is the failure in a
    few words and ``hint`` how to fix it, both free of secrets.
    """

    def __init__(self, message: str, *, attempts: int, status: int | None = None, kind: str = TRANSIENT,
                 cause: str = "", hint: str = "", endpoint: str = ""):
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.kind = kind
        self.cause = cause or message
        self.hint = hint
        self.endpoint = endpoint

    @property
    def endpoint_error(self) -> bool:
        return self.kind in ENDPOINT_KINDS


class LLMEndpointError(LLMError):
    """The endpoint failed several prompts in a row for the same reason: the batch should stop.

    Either it is unusable (no retry fixes it: unreachable, key, model, request) or it kept failing the same
    way through every retry (HTTP 500 for every prompt, a server that never answers within the timeout).
    """

    def __init__(self, error: LLMRequestError, consecutive: int):
        self.error = error
        self.consecutive = consecutive
        if error.endpoint_error:
            tries, hint = "", error.hint
        else:  # transient failures that every retry met too
            tries = f" ({error.attempts} tries each)"
            hint = ("the server keeps failing this way: check it (its log, its load)"
                    + (", or raise --llm-timeout" if failure_reason(error) == TIMED_OUT else ""))
        hint = f"; {hint}" if hint else ""
        super().__init__(f"stopped: {consecutive} prompt(s) in a row failed at {error.endpoint}{tries}: "
                         f"{error.cause}{hint}")


TIMED_OUT = "request timed out"  # the cause of a timed-out request (classify_request_error)


def failure_reason(error: LLMRequestError) -> str:
    """What prompts failing the same way share: "endpoint" for an unusable endpoint, else the HTTP status or the
    kind of failure ("request timed out", "connection error", "malformed response")."""
    if error.endpoint_error:
        return "endpoint"
    if error.status is not None:
        return f"HTTP {error.status}"
    return error.cause.split(":")[0]


class EndpointFailureGuard:
    """Counts prompts in a row whose request failed for the same reason; raises at the limit.

    Call :meth:`record` once per finished prompt, in the order the batch handles them, with the
    :class:`LLMRequestError` it failed with or None (any reply, even an unparsable one, proves the
    endpoint works). Reasons (:func:`failure_reason`): an unusable endpoint (never retried), or a
    transient failure that outlived every retry (the same HTTP status, timeouts, ...). The streak restarts
    when the reason changes and resets on anything else.
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_ENDPOINT_FAILURES):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, found {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.reason: str | None = None

    def record(self, error: BaseException | None) -> None:
        if isinstance(error, LLMRequestError) and error.kind != CANCELLED:
            reason = failure_reason(error)
            self.consecutive = self.consecutive + 1 if reason == self.reason else 1
            self.reason = reason
            if self.consecutive >= self.max_consecutive:
                raise LLMEndpointError(error, self.consecutive)
        else:
            self.consecutive = 0
            self.reason = None


class LayoutQueryError(LLMError):
    """No reply to a caption parsed; ``errors`` holds one problem per attempt."""

    def __init__(self, prompt: str, errors: Sequence[str]):
        self.prompt = prompt
        self.errors = tuple(errors)
        self.problem = (f"no parsable reply in {len(self.errors)} attempt(s); last problem: "
                        f"{self.errors[-1] if self.errors else 'none'}")
        super().__init__(f"prompt {prompt!r}: {self.problem}")


def describe_layout_error(error: LayoutError) -> str:
    """One line: where, what, and a snippet of the text (the prompt is left to the caller)."""
    description = f"{error.where}: {error.problem}" if error.where else error.problem
    if error.text is not None:
        snippet = " ".join(error.text.split())
        if len(snippet) > 120:
            snippet = snippet[:117] + "..."
        description += f" (text: {snippet!r})"
    return " ".join(description.split())


@dataclass(frozen=True)
class LLMConfig:
    """One LLM endpoint and how to ask it. The API key is deliberately not part of it.

    ``base_url`` None means OpenAI's own endpoint. ``max_retries`` counts tries after the first,
    so the default makes 5 tries in all, like the reference (which gave up after 5 failures).
    """

    model: str
    base_url: str | None = None
    temperature: float = 0.25      # spec 2.1
    max_tokens: int = 900          # spec 2.1
    timeout_s: float = 120.0       # per request
    max_retries: int = 4
    retry_base_delay_s: float = 1.0
    retry_max_delay_s: float = 30.0

    def __post_init__(self):
        if not self.model:
            raise LLMConfigError("LLMConfig.model is empty; pass a model name such as gpt-4-1106-preview")
        if not 0 <= self.max_retries <= MAX_RETRIES_LIMIT:
            raise LLMConfigError(f"max_retries must be in 0..{MAX_RETRIES_LIMIT}, found {self.max_retries}")
        delays = {"retry_base_delay_s": self.retry_base_delay_s, "retry_max_delay_s": self.retry_max_delay_s}
        for name, value in delays.items():
            if not (math.isfinite(value) and value >= 0):
                raise LLMConfigError(f"{name} must be a finite number >= 0, found {value}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise LLMConfigError(f"timeout_s must be a finite number > 0, found {self.timeout_s}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise LLMConfigError(f"temperature must be in [0, 2], found {self.temperature}")
        if self.max_tokens < 1:
            raise LLMConfigError(f"max_tokens must be >= 1, found {self.max_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model_name(model: str) -> str:
    """``gpt-3.5`` -> ``gpt-3.5-turbo``, ``vicuna`` -> ``vicuna-13b``; other names unchanged."""
    return MODEL_ALIASES.get(model, model)


def resolve_base_url(flag_value: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The flag wins, then ``OPENAI_BASE_URL``; None means OpenAI's default endpoint."""
    env = os.environ if env is None else env
    value = flag_value or env.get(BASE_URL_ENV) or None
    return value.rstrip("/") if value else None


def is_openai_endpoint(base_url: str | None) -> bool:
    return base_url is None or urlparse(base_url).hostname == OPENAI_HOST


def _read_key_file(path: str | os.PathLike, source: str) -> str:
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise LLMConfigError(f"cannot read the API key file {str(path)!r} (from {source}): "
                             f"{error.strerror or error}") from None
    if not key:
        raise LLMConfigError(f"the API key file {str(path)!r} (from {source}) is empty")
    return key


def resolve_api_key(base_url: str | None, key_file: str | os.PathLike | None = None,
                    env: Mapping[str, str] | None = None) -> str:
    """The API key: a key file given as a flag, then ``OPENAI_API_KEY``, then the file named
    by ``OPENAI_API_KEY_FILE``. Without any, a local server gets a placeholder key and OpenAI's
    endpoint raises :class:`LLMConfigError`."""
    env = os.environ if env is None else env
    if key_file:
        return _read_key_file(key_file, "--llm-api-key-file")
    if env.get(API_KEY_ENV, "").strip():
        return env[API_KEY_ENV].strip()
    if env.get(API_KEY_FILE_ENV):
        return _read_key_file(env[API_KEY_FILE_ENV], API_KEY_FILE_ENV)
    if is_openai_endpoint(base_url):
        raise LLMConfigError(
            f"no API key for {base_url or 'the OpenAI API'}: set {API_KEY_ENV}, or {API_KEY_FILE_ENV} / "
            f"--llm-api-key-file to a file holding the key; for a local OpenAI-compatible server "
            f"(vLLM, Ollama, llama.cpp) pass --llm-base-url http://HOST:PORT/v1 instead")
    logger.info("no API key set; using a placeholder key for %s", base_url)
    return PLACEHOLDER_API_KEY


def compute_retry_delay_s(config: LLMConfig, failures: int) -> float:
    """Backoff before the next try after ``failures`` failed tries: base * 2^(failures-1), capped."""
    return min(config.retry_base_delay_s * 2 ** (failures - 1), config.retry_max_delay_s)


class MalformedResponseError(LLMError):
    """A 2xx answer whose body is not a chat completion (not JSON, truncated JSON, HTML, no choices)."""


def _error_chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _cannot_connect(error: BaseException) -> bool:
    """True when no connection could be made at all (refused, unknown host), as opposed to a dropped one."""
    return any(isinstance(e, (ConnectionRefusedError, socket.gaierror))
               or any(cls.__name__ == "ConnectError" for cls in type(e).__mro__) for e in _error_chain(error))


def _one_line(text: object, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def classify_request_error(error: Exception) -> tuple[str, int | None, str]:
    """(kind, HTTP status or None, one-line description) of a failed chat request."""
    import openai

    if isinstance(error, MalformedResponseError):
        return TRANSIENT, None, f"malformed response: {error}"
    if isinstance(error, openai.APITimeoutError):
        return TRANSIENT, None, TIMED_OUT
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        description = _one_line(cause) or type(cause).__name__
        if _cannot_connect(error):
            return UNREACHABLE, None, f"cannot connect: {description}"
        return TRANSIENT, None, f"connection error: {description}"
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        message = re.sub(r"^Error code: \d+ - ", "", _one_line(error.message))  # the library's prefix
        description = f"HTTP {status}: {_one_line(message, 300)}"
        if status in RETRYABLE_STATUSES or status >= 500:
            return TRANSIENT, status, description
        if status in (401, 403):
            return AUTH, status, description
        if status == 404:
            return NOT_FOUND, status, description
        return REJECTED, status, description
    if isinstance(error, openai.APIResponseValidationError):
        return TRANSIENT, getattr(error.response, "status_code", None), f"malformed response: {error}"
    return REJECTED, None, f"{type(error).__name__}: {error}"


def _endpoint_hint(kind: str, config: "LLMConfig") -> str:
    if kind == UNREACHABLE:
        return ("is the server running? Check --llm-base-url (or $OPENAI_BASE_URL), e.g. "
                "http://localhost:8000/v1")
    if kind == AUTH:
        return (f"check the API key: ${API_KEY_ENV}, or --llm-api-key-file / ${API_KEY_FILE_ENV}; "
                f"a local server needs --llm-base-url")
    if kind == NOT_FOUND:
        return (f"check --model ({config.model!r} may not be served there) and that --llm-base-url ends in /v1")
    if kind == REJECTED:
        return "check --model and the request settings (--llm-max-tokens, --llm-temperature)"
    return ""


def _parse_completion(text: str) -> str:
    """The reply text of a chat-completion body; raises :class:`MalformedResponseError`."""
    snippet = repr(_one_line(text, BODY_SNIPPET_CHARS))
    try:
        body = json.loads(text)
    except ValueError as error:
        raise MalformedResponseError(f"the body is not JSON ({error}): {snippet}") from None
    if not isinstance(body, dict):
        raise MalformedResponseError(f"expected a JSON object, found {type(body).__name__}: {snippet}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        if isinstance(body.get("error"), dict):
            raise MalformedResponseError(f"an error in a 2xx answer: {_one_line(body['error'].get('message'), 300)}")
        raise MalformedResponseError(f"no choices in the answer: {snippet}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(message, dict):
        return ""  # a chat message with no content: an empty reply, which the parser reports
    if not isinstance(content, str):
        raise MalformedResponseError(f"choices[0].message.content is not text: {snippet}")
    return content


class LLMClient:
    """A thread-safe chat client with bounded retries (one ``openai.OpenAI`` shared by threads).

    Every message it raises or logs has the API key (and any ``sk-...`` token) redacted.
    :meth:`close` makes waiting and later requests end at once (a batch that stops or is interrupted).
    """

    def __init__(self, config: LLMConfig, api_key: str, *, sleep: Callable[[float], None] | None = None):
        import openai

        self.config = config
        self._secrets = (api_key,)
        self._closed = threading.Event()
        self._sleep = sleep if sleep is not None else self._closed.wait
        # Retries are ours (logged, bounded, capped backoff), so the library's are off.
        # An explicit URL: with None the library would read $OPENAI_BASE_URL behind the config's back.
        self._client = openai.OpenAI(api_key=api_key, base_url=config.base_url or OPENAI_BASE_URL,
                                     timeout=config.timeout_s, max_retries=0)

    @property
    def endpoint(self) -> str:
        return self.config.base_url or OPENAI_BASE_URL

    @property
    def secrets(self) -> tuple[str, ...]:
        """What :func:`utils.redact.redact_secrets` must remove from anything about this client."""
        return self._secrets

    def redact(self, text: str) -> str:
        return redact_secrets(text, self._secrets)

    def close(self) -> None:
        """Stop: backoff waits end now and every later :meth:`complete` raises a ``cancelled`` error."""
        self._closed.set()
        self._client.close()

    def _send(self, messages: Messages) -> str:
        raw = self._client.chat.completions.with_raw_response.create(
            model=self.config.model, messages=list(messages),
            temperature=self.config.temperature, max_tokens=self.config.max_tokens)
        # The body is parsed here, not by the library: a body that is not a chat completion (HTML
        # from a proxy, truncated JSON) must be a retryable failure, not an AttributeError.
        return _parse_completion(raw.text)

    def complete(self, messages: Messages) -> str:
        """Send a chat and return the reply text (``choices[0].message.content``)."""
        import openai

        config = self.config
        where = f"model {config.model!r} at {self.endpoint}"
        max_tries = config.max_retries + 1
        for attempt in range(1, max_tries + 1):
            if self._closed.is_set():
                raise LLMRequestError(f"chat request to {where} cancelled: the client is closed",
                                      attempts=attempt - 1, kind=CANCELLED, endpoint=self.endpoint)
            try:
                return self._send(messages)
            except (openai.OpenAIError, MalformedResponseError) as error:
                kind, status, description = classify_request_error(error)
                description = self.redact(description)
                if self._closed.is_set():
                    kind = CANCELLED
                if kind != TRANSIENT or attempt == max_tries:
                    reason = {TRANSIENT: f"gave up after {attempt} tries", CANCELLED: "cancelled"}.get(
                        kind, "not retried")
                    # from None: the library's exception holds the unredacted server answer.
                    raise LLMRequestError(f"chat request to {where} failed ({reason}): {description}",
                                          attempts=attempt, status=status, kind=kind, cause=description,
                                          hint=_endpoint_hint(kind, config), endpoint=self.endpoint) from None
                delay_s = compute_retry_delay_s(config, attempt)
                logger.warning("chat request to %s failed (try %d of %d): %s; retrying in %.3g s",
                               where, attempt, max_tries, description, delay_s)
                self._sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")


def build_client(config: LLMConfig, key_file: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None) -> LLMClient:
    """An :class:`LLMClient` with the key resolved by :func:`resolve_api_key`."""
    return LLMClient(config, resolve_api_key(config.base_url, key_file, env))


@dataclass(frozen=True)
class LayoutReply:
    """A reply text as received and the layout it parses to."""

    text: str
    layout: SceneLayout
    attempts: int


def query_layout(client: LLMClient, messages: Messages, prompt: str, *, max_parse_attempts: int = 2,
                 parse_retry_delay_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 validate: Callable[[SceneLayout], None] | None = None) -> LayoutReply:
    """Ask for a layout until a reply parses (at most ``max_parse_attempts`` requests).

    The reference retries an unparsable reply once after 1 s (spec 1.3). ``validate`` (e.g.
    :func:`utils.layout.validate_layout_for_generation` with a tokenizer) may reject a parsed layout
    with a :class:`LayoutError`, which counts as an unparsable reply. Raises :class:`LayoutQueryError`
    when no reply parses and :class:`LLMRequestError` when a request fails.
    """
    errors = []
    for attempt in range(1, max_parse_attempts + 1):
        text = client.complete(messages)
        try:
            layout = parse_layout(text, prompt)
            if validate is not None:
                validate(layout)
            return LayoutReply(text=text, layout=layout, attempts=attempt)
        except LayoutError as error:
            errors.append(client.redact(describe_layout_error(error)))
            logger.info("prompt %r: reply %d of %d does not parse: %s", prompt, attempt, max_parse_attempts,
                        errors[-1])
            if attempt < max_parse_attempts:
                sleep(parse_retry_delay_s)
    raise LayoutQueryError(prompt, errors)


# --------------------------------------------------------------------------------------------
# Command-line options shared by prompt_batch.py and scripts/eval_stage_one.py


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """The LLM flags; every number is checked at parse time (argparse names the flag, value and range)."""
    group = parser.add_argument_group("LLM endpoint (OpenAI or any OpenAI-compatible server)")
    group.add_argument("--llm-base-url", default=None,
                       help=f"chat API base URL, e.g. http://localhost:8000/v1 (vLLM) or "
                            f"http://localhost:11434/v1 (Ollama); default ${BASE_URL_ENV}, else OpenAI")
    group.add_argument("--llm-api-key-file", default=None,
                       help=f"file holding the API key; default ${API_KEY_ENV}, then the file named by "
                            f"${API_KEY_FILE_ENV}; local servers need none")
    group.add_argument("--llm-temperature", type=float_in(0, 2), default=LLMConfig.temperature,
                       help="sampling temperature, 0..2 (the paper: 0.25)")
    group.add_argument("--llm-max-tokens", type=int_in(1), default=LLMConfig.max_tokens,
                       help="reply length limit in tokens (the paper: 900)")
    group.add_argument("--llm-timeout", type=float_in(0, low_open=True), default=LLMConfig.timeout_s,
                       help="seconds per request")
    group.add_argument("--llm-max-retries", type=int_in(0, MAX_RETRIES_LIMIT), default=LLMConfig.max_retries,
                       help="retries after a transient failure (429, 5xx, timeout, malformed answer)")
    group.add_argument("--llm-retry-delay", type=float_in(0), default=LLMConfig.retry_base_delay_s,
                       help="first backoff in seconds; it doubles per failure")
    group.add_argument("--llm-retry-max-delay", type=float_in(0), default=LLMConfig.retry_max_delay_s,
                       help="cap on one backoff, in seconds")
    group.add_argument("--llm-max-endpoint-failures", type=int_in(1), default=DEFAULT_MAX_ENDPOINT_FAILURES,
                       help="stop the batch after this many prompts in a row fail for the same reason: the endpoint "
                            "is unusable (cannot connect, 401/403, 404, 400; never retried), or every retry met "
                            "the same failure (e.g. HTTP 500, or no answer within --llm-timeout)")
    group.add_argument("--parse-attempts", type=int_in(1, MAX_PARSE_ATTEMPTS_LIMIT), default=2,
                       help="requests per caption until a reply parses (the reference: 2)")
    group.add_argument("--parse-retry-delay", type=float_in(0), default=1.0,
                       help="seconds to wait before asking again after an unparsable reply")


def llm_config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> LLMConfig:
    return LLMConfig(model=resolve_model_name(args.model), base_url=resolve_base_url(args.llm_base_url, env),
                     temperature=args.llm_temperature, max_tokens=args.llm_max_tokens,
                     timeout_s=args.llm_timeout, max_retries=args.llm_max_retries,
                     retry_base_delay_s=args.llm_retry_delay, retry_max_delay_s=args.llm_retry_max_delay)
