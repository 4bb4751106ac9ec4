"""Stage-1 LLM client: chat completions from OpenAI or any OpenAI-compatible server.

The request follows reference spec 2.1 (chat messages, ``temperature`` 0.25, ``max_tokens`` 900,
no stop string). Differences from the reference, none of which changes a reply:

- The key comes from ``OPENAI_API_KEY``, a key file (``--llm-api-key-file`` or
  ``OPENAI_API_KEY_FILE``) or, for a local server, a placeholder; the reference read a git-ignored
  Python module only.
- The base URL comes from ``--llm-base-url`` or ``OPENAI_BASE_URL``, so vLLM, Ollama or
  llama.cpp serve any model name through the same chat endpoint.
- Retries are bounded with exponential backoff on 429, 5xx, timeouts and connection errors; the
  last failure raises :class:`LLMRequestError` for the batch to record, instead of ``exit()``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

from utils.layout import LayoutError, SceneLayout, parse_layout

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

Messages = Sequence[Mapping[str, str]]


class LLMError(RuntimeError):
    """Base class of the LLM client's errors."""


class LLMConfigError(LLMError):
    """The client cannot be built (no API key for OpenAI, unreadable key file, bad setting)."""


class LLMRequestError(LLMError):
    """A chat request failed for good: not retryable, or still failing after the last try."""

    def __init__(self, message: str, *, attempts: int, status: int | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.status = status


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
        if self.max_retries < 0 or self.retry_base_delay_s < 0 or self.retry_max_delay_s < 0:
            raise LLMConfigError(f"retry settings must be >= 0, found max_retries={self.max_retries}, "
                                 f"retry_base_delay_s={self.retry_base_delay_s}, "
                                 f"retry_max_delay_s={self.retry_max_delay_s}")
        if self.timeout_s <= 0:
            raise LLMConfigError(f"timeout_s must be > 0, found {self.timeout_s}")

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


def _classify_error(error: Exception) -> tuple[bool, int | None, str]:
    """(retryable, HTTP status or None, one-line description) for an openai exception."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return True, None, "request timed out"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return True, None, f"connection error: {' '.join(str(cause).split()) or type(cause).__name__}"
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        retryable = status in RETRYABLE_STATUSES or status >= 500
        return retryable, status, f"HTTP {status}: {' '.join(str(error.message).split())[:300]}"
    if isinstance(error, openai.APIResponseValidationError):
        return True, getattr(error.response, "status_code", None), f"malformed response: {error}"
    return False, None, f"{type(error).__name__}: {error}"


class LLMClient:
    """A thread-safe chat client with bounded retries (one ``openai.OpenAI`` shared by threads)."""

    def __init__(self, config: LLMConfig, api_key: str, *, sleep: Callable[[float], None] = time.sleep):
        import openai

        self.config = config
        self._sleep = sleep
        # Retries are ours (logged, bounded, capped backoff), so the library's are off.
        # An explicit URL: with None the library would read $OPENAI_BASE_URL behind the config's back.
        self._client = openai.OpenAI(api_key=api_key, base_url=config.base_url or OPENAI_BASE_URL,
                                     timeout=config.timeout_s, max_retries=0)

    def complete(self, messages: Messages) -> str:
        """Send a chat and return the reply text (``choices[0].message.content``)."""
        import openai

        config = self.config
        max_tries = config.max_retries + 1
        for attempt in range(1, max_tries + 1):
            try:
                response = self._client.chat.completions.create(
                    model=config.model, messages=list(messages),
                    temperature=config.temperature, max_tokens=config.max_tokens)
            except openai.OpenAIError as error:
                retryable, status, description = _classify_error(error)
                where = f"model {config.model!r} at {config.base_url or OPENAI_BASE_URL}"
                if not retryable or attempt == max_tries:
                    reason = "not retryable" if not retryable else f"gave up after {attempt} tries"
                    raise LLMRequestError(f"chat request to {where} failed ({reason}): {description}",
                                          attempts=attempt, status=status) from error
                delay_s = compute_retry_delay_s(config, attempt)
                logger.warning("chat request to %s failed (try %d of %d): %s; retrying in %.3g s",
                               where, attempt, max_tries, description, delay_s)
                self._sleep(delay_s)
                continue
            if not response.choices:
                raise LLMRequestError(f"model {config.model!r} returned no choices", attempts=attempt)
            return response.choices[0].message.content or ""
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
                 parse_retry_delay_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> LayoutReply:
    """Ask for a layout until a reply parses (at most ``max_parse_attempts`` requests).

    The reference retries an unparsable reply once after 1 s (spec 1.3). Raises
    :class:`LayoutQueryError` when no reply parses and :class:`LLMRequestError` when a request fails.
    """
    errors = []
    for attempt in range(1, max_parse_attempts + 1):
        text = client.complete(messages)
        try:
            return LayoutReply(text=text, layout=parse_layout(text, prompt), attempts=attempt)
        except LayoutError as error:
            errors.append(describe_layout_error(error))
            logger.info("prompt %r: reply %d of %d does not parse: %s", prompt, attempt, max_parse_attempts,
                        errors[-1])
            if attempt < max_parse_attempts:
                sleep(parse_retry_delay_s)
    raise LayoutQueryError(prompt, errors)


# --------------------------------------------------------------------------------------------
# Command-line options shared by prompt_batch.py and scripts/eval_stage_one.py


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LLM endpoint (OpenAI or any OpenAI-compatible server)")
    group.add_argument("--llm-base-url", default=None,
                       help=f"chat API base URL, e.g. http://localhost:8000/v1 (vLLM) or "
                            f"http://localhost:11434/v1 (Ollama); default ${BASE_URL_ENV}, else OpenAI")
    group.add_argument("--llm-api-key-file", default=None,
                       help=f"file holding the API key; default ${API_KEY_ENV}, then the file named by "
                            f"${API_KEY_FILE_ENV}; local servers need none")
    group.add_argument("--llm-temperature", type=float, default=LLMConfig.temperature)
    group.add_argument("--llm-max-tokens", type=int, default=LLMConfig.max_tokens)
    group.add_argument("--llm-timeout", type=float, default=LLMConfig.timeout_s, help="seconds per request")
    group.add_argument("--llm-max-retries", type=int, default=LLMConfig.max_retries,
                       help="retries after a failed request (429, 5xx, timeout, connection error)")
    group.add_argument("--llm-retry-delay", type=float, default=LLMConfig.retry_base_delay_s,
                       help="first backoff in seconds; it doubles per failure")
    group.add_argument("--llm-retry-max-delay", type=float, default=LLMConfig.retry_max_delay_s,
                       help="cap on one backoff, in seconds")
    group.add_argument("--parse-attempts", type=int, default=2,
                       help="requests per caption until a reply parses (the reference: 2)")
    group.add_argument("--parse-retry-delay", type=float, default=1.0,
                       help="seconds to wait before asking again after an unparsable reply")


def llm_config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> LLMConfig:
    return LLMConfig(model=resolve_model_name(args.model), base_url=resolve_base_url(args.llm_base_url, env),
                     temperature=args.llm_temperature, max_tokens=args.llm_max_tokens,
                     timeout_s=args.llm_timeout, max_retries=args.llm_max_retries,
                     retry_base_delay_s=args.llm_retry_delay, retry_max_delay_s=args.llm_retry_max_delay)
