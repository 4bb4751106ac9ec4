"""Secrets out of everything the project prints or writes: the configured API key and any token shaped
like an OpenAI key (``sk-...``), replaced by a fixed marker. A server that echoes the key in an error
body (``Incorrect API key provided: sk-...``) must not get it into a console line, a log or a file."""
from __future__ import annotations

import re
from typing import Any, Iterable

REDACTED = "[REDACTED]"
# OpenAI-style keys: sk-..., sk-proj-..., sk-svcacct-... (letters, digits, - and _).
KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
# Shorter configured "secrets" (a placeholder such as "x") are not worth hiding and would mangle text.
MIN_SECRET_CHARS = 8


def redact_secrets(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every configured secret and every ``sk-...`` token replaced by ``[REDACTED]``."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return KEY_PATTERN.sub(REDACTED, text)


def redact_value(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """:func:`redact_secrets` applied to every string inside JSON-like data (dicts, lists, tuples)."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact_secrets(value, secrets)
    if isinstance(value, dict):
        return {redact_value(k, secrets): redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    return value
