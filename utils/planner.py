"""Stage 1 as one library call: the layout of a (prompt, occurrence), from the cache or else from the LLM.

Every CLI that needs layouts (``prompt_batch.py``, ``scripts/eval_stage_one.py``, ``generate.py``) goes
through :func:`load_or_query_layout`, so "look it up, else query, parse, save" exists once:

- a cached reply is parsed (and validated by ``validate``, e.g. for stage 2) and returned;
- a miss without a ``query`` raises :class:`CacheMissError`;
- a miss with a ``query`` asks it (the query parses and validates, and retries unparsable replies:
  :func:`utils.llm.query_layout`), optionally lets ``accept`` look at the reply, and stores it with
  :meth:`utils.cache.LayoutCache.store`, which never stores a second reply for one occurrence. If
  another process stored one first, that one is returned (it is what later stages will read).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from utils.cache import LayoutCache
from utils.layout import SceneLayout, parse_layout
from utils.llm import (DEFAULT_MAX_ENDPOINT_FAILURES, EndpointFailureGuard, LayoutQueryError, LayoutReply,
                       LLMEndpointError, LLMRequestError)

logger = logging.getLogger(__name__)

# prompt -> a parsed reply; raises utils.llm.LLMRequestError / LayoutQueryError on failure.
QueryFn = Callable[[str], LayoutReply]
# Looks at a new reply: True saves it, False asks the query again, None drops it (nothing saved).
AcceptFn = Callable[[LayoutReply], "bool | None"]
Source = Literal["cache", "llm"]


class CacheMissError(LookupError):
    """The cache has no reply for this (prompt, occurrence) and there is no way to query one."""

    def __init__(self, prompt: str, occurrence: int, path):
        self.prompt = prompt
        self.occurrence = occurrence
        self.path = path
        super().__init__(f"no cached reply {occurrence} for prompt {prompt!r} in {path}")


@dataclass(frozen=True)
class PlannedLayout:
    """The reply text, its layout and where it came from.

    ``saved``: the text is in the cache as reply ``stored_index`` of the prompt (always true for
    ``source == "cache"``; false when ``accept`` dropped a new reply). ``stored_index`` differs from
    the occurrence only for a shard that starts mid-repeat on a cache without the earlier replies.
    """

    text: str
    layout: SceneLayout
    source: Source
    saved: bool
    stored_index: int | None
    attempts: int = 0  # LLM requests it took (0 for a cache hit)


def load_or_query_layout(cache: LayoutCache, prompt: str, occurrence: int, query: QueryFn | None = None, *,
                         validate: Callable[[SceneLayout], None] | None = None,
                         accept: AcceptFn | None = None) -> PlannedLayout:
    """The layout of occurrence ``occurrence`` of ``prompt``: cached, else queried and saved.

    Raises :class:`utils.layout.LayoutError` for a cached reply that does not parse or that
    ``validate`` rejects, :class:`CacheMissError` for a miss without ``query``, and whatever
    ``query`` raises (``LLMRequestError``, ``LayoutQueryError``).
    """
    text = cache.get(prompt, occurrence)
    if text is not None:
        return _from_cache(text, prompt, occurrence, validate)
    if query is None:
        raise CacheMissError(prompt, occurrence, cache.path)
    while True:
        reply = query(prompt)
        decision = True if accept is None else accept(reply)
        if decision is None:
            return PlannedLayout(reply.text, reply.layout, "llm", saved=False, stored_index=None,
                                 attempts=reply.attempts)
        if decision:
            break
        # False: ask again (the reference re-queries on any answer but y/Y, spec 1.3).
    index, added = cache.store(prompt, occurrence, reply.text)
    if not added:
        logger.info("prompt %r: reply %d was stored by another writer meanwhile; using that one", prompt, index)
        return _from_cache(cache.get(prompt, index), prompt, index, validate)
    if index != occurrence:
        logger.warning("prompt %r: the reply was saved as reply %d of this prompt, but this run wanted reply %d "
                       "(earlier occurrences are not cached yet)", prompt, index, occurrence)
    return PlannedLayout(reply.text, reply.layout, "llm", saved=True, stored_index=index, attempts=reply.attempts)


def _from_cache(text: str, prompt: str, index: int, validate) -> PlannedLayout:
    layout = parse_layout(text, prompt)
    if validate is not None:
        validate(layout)
    return PlannedLayout(text, layout, "cache", saved=True, stored_index=index)


@dataclass
class PlanReport:
    """What :func:`plan_missing_layouts` did: replies saved, prompts that failed, and why it stopped early."""

    new: int = 0
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (prompt, occurrence, problem)
    stopped: str | None = None


def plan_missing_layouts(cache: LayoutCache, wanted: Sequence[tuple[str, int]], query: QueryFn, *,
                         validate: Callable[[SceneLayout], None] | None = None,
                         max_endpoint_failures: int = DEFAULT_MAX_ENDPOINT_FAILURES,
                         on_failure: Callable[[str, int, str], None] | None = None) -> PlanReport:
    """Query and save the layout of every (prompt, occurrence) of ``wanted`` that the cache lacks, one at a
    time through :func:`load_or_query_layout` (``prompt_batch.py``'s path, for ``generate.py --auto-query``).

    A failed prompt is reported (``on_failure``) and the others go on, until ``max_endpoint_failures``
    prompts in a row fail for the same reason (:class:`utils.llm.EndpointFailureGuard`): then it stops,
    saying why in ``stopped``. What was saved stays saved.
    """
    report = PlanReport()
    guard = EndpointFailureGuard(max_endpoint_failures)
    for prompt, occurrence in dict.fromkeys(wanted):
        if cache.get(prompt, occurrence) is not None:
            continue
        try:
            planned = load_or_query_layout(cache, prompt, occurrence, query, validate=validate)
        except (LLMRequestError, LayoutQueryError) as error:
            problem = error.problem if isinstance(error, LayoutQueryError) else str(error)
            report.failures.append((prompt, occurrence, problem))
            if on_failure is not None:
                on_failure(prompt, occurrence, problem)
            try:
                guard.record(error)
            except LLMEndpointError as stop:
                report.stopped = str(stop)
                break
            continue
        guard.record(None)
        report.new += planned.source == "llm"
    return report
