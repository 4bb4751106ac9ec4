"""Stage-1 data: LLM templates and prompt sets (demo and the LVD benchmark).

Templates are JSON files in ``templates/`` (``<version>.json``): a system message, worked
examples and a caption prefix. Add a file there, or pass a path, to use your own template without
touching code. Prompt sets are plain data built from the benchmark's word lists (reference spec 9).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.layout import normalize_prompt
from utils.predicates import (LEFT_TO_RIGHT, RIGHT_TO_LEFT, AttributionCheck, Check, DynamicSpatialCheck,
                              NumeracyCheck, SequentialCheck, VisibilityCheck)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATE_VERSION = "v0.1"

DEMO_PROMPTS = ("A bear walks from the left to the right",)


# --------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Template:
    version: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (caption, response) pairs
    caption_prefix: str = "Caption: "
    num_keyframes: int = 6


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.json"))


def load_template(version_or_path: str = DEFAULT_TEMPLATE_VERSION) -> Template:
    """A template by version name (a file in ``templates/``) or by path to a JSON file."""
    path = Path(version_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = TEMPLATE_DIR / f"{version_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no template {version_or_path!r}: expected one of {available_templates()} "
                                f"(files in {TEMPLATE_DIR}) or a path to a JSON template file")
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return Template(version=data.get("version", path.stem), system=data["system"],
                        examples=tuple((e["caption"], e["response"]) for e in data["examples"]),
                        caption_prefix=data.get("caption_prefix", "Caption: "),
                        num_keyframes=int(data.get("num_keyframes", 6)))
    except (KeyError, TypeError) as error:
        raise ValueError(f"template {path} lacks a field: {error}; expected 'system' and "
                         "'examples' [{'caption', 'response'}]") from None


def build_messages(template: Template, prompt: str) -> list[dict[str, str]]:
    """The chat: system, then (user caption, assistant layout) per example, then the caption."""
    messages = [{"role": "system", "content": template.system}]
    for caption, response in template.examples:
        messages.append({"role": "user", "content": template.caption_prefix + caption})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": template.caption_prefix + normalize_prompt(prompt)})
    return messages


def format_messages(messages: list[dict[str, str]]) -> str:
    """Messages as plain text, for pasting into a chat UI (manual mode)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


# --------------------------------------------------------------------------------------------
# The LVD benchmark (spec 9)

PREFIX = "A realistic lively video of a scene"
PREFIX_TOP_DOWN = "A realistic lively video of a top-down viewed scene"
CLASSES = (("moving car", "car"), ("lively cat", "cat"), ("flying bird", "bird"),
           ("moving ball", "ball"), ("walking dog", "dog"))
BARE_CLASSES = tuple(bare for _, bare in CLASSES)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
SEQUENTIAL_PATHS = (("lower left", "lower right", "upper right"), ("lower left", "upper left", "upper right"),
                    ("lower right", "lower left", "upper left"), ("lower right", "upper right", "upper left"))


@dataclass(frozen=True)
class BenchmarkPrompt:
    prompt: str
    check: Check

    @property
    def task(self) -> str:
        return self.check.task


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def _query(noun_phrase: str) -> str:
    return f"a photo of {_inflect().a(noun_phrase)}"


def _numeracy() -> list[BenchmarkPrompt]:
    p = _inflect()
    items = []
    for count in range(1, 5):
        for obj, bare in CLASSES:
            noun = obj if count == 1 else p.plural(obj)
            prompt = f"{PREFIX} with {p.number_to_words(count)} {noun}"
            items += [BenchmarkPrompt(prompt, NumeracyCheck(bare, count, (_query(bare),)))] * 5
    return items


def _attribution() -> list[BenchmarkPrompt]:
    p = _inflect()
    items = []
    for seed in range(100):
        rng = np.random.RandomState(seed)  # same stream as the reference's np.random.seed(seed)
        color1, color2 = rng.choice(COLORS, 2, replace=False)
        obj1, obj2 = rng.choice(BARE_CLASSES, 2, replace=False)
        prompt = f"{PREFIX} with {p.a(color1)} {obj1} and {p.a(color2)} {obj2}"
        names = (f"{color1} {obj1}", f"{color2} {obj2}")
        items.append(BenchmarkPrompt(prompt, AttributionCheck(names, tuple(_query(n) for n in names))))
    return items


def _visibility() -> list[BenchmarkPrompt]:
    p = _inflect()
    items = []
    for obj, bare in CLASSES:
        for half, appears in (("second", True), ("first", False)):
            prompt = f"{PREFIX} in which {p.a(obj)} appears only in the {half} half of the video"
            items += [BenchmarkPrompt(prompt, VisibilityCheck(bare, appears, (_query(bare),)))] * 10
    return items


_DIRECTIONS = (("left", "right", LEFT_TO_RIGHT), ("right", "left", RIGHT_TO_LEFT))


def _dynamic_spatial() -> list[BenchmarkPrompt]:
    p = _inflect()
    items = []
    for bare in BARE_CLASSES:
        for start, end, direction in _DIRECTIONS:
            prompt = f"{PREFIX} with {p.a(bare)} moving from the {start} to the {end}"
            items += [BenchmarkPrompt(prompt, DynamicSpatialCheck((bare,), direction, (_query(bare),)))] * 5
    for seed in range(25):
        rng = np.random.RandomState(seed)
        for start, end, direction in _DIRECTIONS:
            obj1, obj2 = rng.choice(BARE_CLASSES, 2, replace=False)
            prompt = f"{PREFIX} with {p.a(obj1)} moving from the {start} of {p.a(obj2)} to its {end}"
            check = DynamicSpatialCheck((str(obj1), str(obj2)), direction, (_query(obj1), _query(obj2)))
            items.append(BenchmarkPrompt(prompt, check))
    return items


def _sequential() -> list[BenchmarkPrompt]:
    p = _inflect()
    items = []
    for bare in BARE_CLASSES:
        for first, second, third in SEQUENTIAL_PATHS:
            prompt = (f"{PREFIX_TOP_DOWN} in which {p.a(bare)} initially on the {first} of the scene. "
                      f"It first moves to the {second} of the scene and then moves to the {third} of the scene.")
            check = SequentialCheck(bare, (first, second, third), (_query(bare),))
            items += [BenchmarkPrompt(normalize_prompt(prompt), check)] * 5
    return items


_TASK_BUILDERS = {"numeracy": _numeracy, "attribution": _attribution, "visibility": _visibility,
                  "dynamic_spatial": _dynamic_spatial, "sequential": _sequential}


# --------------------------------------------------------------------------------------------
# The shapes benchmark (issue 15): 20 captions per task in the grammar of shapes.world, each with a check
# of the LVD families above, so both evaluation stages run unchanged. Drawn once from a fixed seed.

SHAPES_PROMPT_TYPE = "shapes"
SHAPES_PER_TASK = 20
SHAPES_SEED = 15


def _shapes_captions() -> list[str]:
    """The 100 captions of ``--prompt-type shapes``, task by task (shapes.world's caption functions);
    every fourth names a background ("on a <bg> background"), the backgrounds in turn."""
    from shapes import world

    kinds = [(colour, shape) for shape in world.SHAPES for colour in world.COLOURS]
    rng = np.random.default_rng(SHAPES_SEED)
    captions = []
    for count in range(1, 5):  # numeracy: five kinds per count
        captions += [world.numeracy_caption(count, *kinds[k]) for k in rng.permutation(len(kinds))[:5]]
    pairs = [(a, b) for a in range(len(kinds)) for b in range(len(kinds)) if a != b]
    captions += [world.attribution_caption(kinds[pairs[p][0]], kinds[pairs[p][1]])
                 for p in rng.permutation(len(pairs))[:SHAPES_PER_TASK]]
    options = [(k, appears) for k in range(len(kinds)) for appears in (True, False)]
    captions += [world.visibility_caption(*kinds[options[o][0]], options[o][1])
                 for o in rng.permutation(len(options))[:SHAPES_PER_TASK]]
    # Dynamic spatial, left/right only (the checks judge x): half one object, half one passing another.
    sides = (("left", "right"), ("right", "left"))
    options = [(k, d) for k in range(len(kinds)) for d in range(2)]
    captions += [world.motion_caption(*kinds[options[o][0]], *sides[options[o][1]])
                 for o in rng.permutation(len(options))[:SHAPES_PER_TASK // 2]]
    options = [(a, b, d) for a, b in pairs for d in range(2)]
    captions += [world.passing_caption(kinds[options[o][0]], kinds[options[o][1]], *sides[options[o][2]])
                 for o in rng.permutation(len(options))[:SHAPES_PER_TASK - SHAPES_PER_TASK // 2]]
    # Sequential: corner triplets, each corner sharing a side with the next (as shapes.world draws them).
    corners = list(world.CORNERS)
    paths = []
    for first in corners:
        for second in corners:
            if len(set(first.split()) & set(second.split())) == 1:
                third = next(c for c in corners if c not in (first, second)
                             and len(set(c.split()) & set(second.split())) == 1)
                paths.append((first, second, third))
    options = [(k, path) for k in range(len(kinds)) for path in range(len(paths))]
    captions += [world.sequential_caption(*kinds[options[o][0]], paths[options[o][1]])
                 for o in rng.permutation(len(options))[:SHAPES_PER_TASK]]
    backgrounds = list(world.BACKGROUNDS)
    return [world.with_background(caption, backgrounds[(index // 4) % len(backgrounds)]) if index % 4 == 3
            else caption for index, caption in enumerate(captions)]


def _shapes_benchmark() -> list[BenchmarkPrompt]:
    """The shapes benchmark: each caption with the check the rule-based planner reads from it."""
    from shapes.planner import build_check

    return [BenchmarkPrompt(caption, build_check(caption)) for caption in _shapes_captions()]


BENCHMARK_PROMPT_TYPES = {
    "lvd": ("numeracy", "attribution", "visibility", "dynamic_spatial", "sequential"),
    "lvd_static": ("numeracy", "attribution"),
    "lvd_dynamic": ("visibility", "dynamic_spatial", "sequential"),
    **{f"lvd_{task}": (task,) for task in _TASK_BUILDERS},
    SHAPES_PROMPT_TYPE: ("numeracy", "attribution", "visibility", "dynamic_spatial", "sequential"),
}
PROMPT_TYPES = ("demo", *BENCHMARK_PROMPT_TYPES)


def get_benchmark(prompt_type: str = "lvd") -> list[BenchmarkPrompt]:
    """The benchmark entries of a prompt type, in the reference order, repeats included."""
    if prompt_type not in BENCHMARK_PROMPT_TYPES:
        raise ValueError(f"unknown benchmark prompt type {prompt_type!r}; expected one of "
                         f"{sorted(BENCHMARK_PROMPT_TYPES)}")
    if prompt_type == SHAPES_PROMPT_TYPE:
        return _shapes_benchmark()
    return [item for task in BENCHMARK_PROMPT_TYPES[prompt_type] for item in _TASK_BUILDERS[task]()]


def get_prompts(prompt_type: str = "demo") -> list[str]:
    """The prompt list of a prompt type, normalised (stripped, trailing periods removed)."""
    if prompt_type == "demo":
        return [normalize_prompt(p) for p in DEMO_PROMPTS]
    if prompt_type not in BENCHMARK_PROMPT_TYPES:
        raise ValueError(f"unknown prompt type {prompt_type!r}; expected one of {list(PROMPT_TYPES)}")
    return [normalize_prompt(item.prompt) for item in get_benchmark(prompt_type)]


def get_prompt_entries(prompt_type: str) -> list[tuple[str, Check | None]]:
    """(normalised prompt, benchmark check or None) of every entry of a prompt type, in generation order."""
    if prompt_type in BENCHMARK_PROMPT_TYPES:
        return [(normalize_prompt(item.prompt), item.check) for item in get_benchmark(prompt_type)]
    return [(prompt, None) for prompt in get_prompts(prompt_type)]


# --------------------------------------------------------------------------------------------
# Free-text prompts: --prompts "A cat ..." "A dog ..." / --prompts-file FILE

CUSTOM_PROMPT_TYPE = "custom"  # the prompt type of free text: cache_custom_<version>_<model>.json
# Every prompt type a CLI can take: the sets above plus free text.
ALL_PROMPT_TYPES = (*PROMPT_TYPES, CUSTOM_PROMPT_TYPE)


class PromptListError(ValueError):
    """The prompt list cannot be built: conflicting flags, an unreadable file, no prompts."""


@dataclass(frozen=True)
class PromptList:
    """The prompts of a run and the prompt type that names its cache and output folders."""

    prompt_type: str
    prompts: tuple[str, ...]
    source: str  # where they came from, for messages: "--prompt-type lvd", "--prompts", "--prompts-file F"

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line, normalised; empty lines and lines starting with ``#`` are skipped.

    Raises :class:`PromptListError` naming the file (and the line) for an unreadable file, a line
    that is empty once normalised (e.g. ``...``) and a file without prompts.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PromptListError(f"--prompts-file {path}: cannot read it ({reason})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt = normalize_prompt(line)
        if not prompt:
            raise PromptListError(f"--prompts-file {path}, line {number}: {line.strip()!r} is no prompt once "
                                  "trailing periods are removed")
        prompts.append(prompt)
    if not prompts:
        raise PromptListError(f"--prompts-file {path}: no prompts in it (one per line; empty lines and "
                              "# comments are skipped)")
    return prompts


def resolve_prompts(prompt_type: str | None = None, prompts: Sequence[str] | None = None,
                    prompts_file: str | Path | None = None, *, default_prompt_type: str = "demo") -> PromptList:
    """The prompt list from exactly one source: a prompt type, ``--prompts`` or ``--prompts-file``.

    Free text gets the prompt type ``custom`` (``prompt_type`` may be None or ``custom`` then);
    without any source, ``default_prompt_type``. Prompts are normalised (stripped, trailing periods
    removed), repeats kept. Raises :class:`PromptListError` for conflicting sources, an empty list
    or an empty prompt, and for ``custom`` without free text.
    """
    if prompts is not None and prompts_file is not None:
        raise PromptListError("give --prompts or --prompts-file, not both")
    free_text = prompts is not None or prompts_file is not None
    if free_text and prompt_type not in (None, CUSTOM_PROMPT_TYPE):
        raise PromptListError(f"--prompts / --prompts-file make the prompt type {CUSTOM_PROMPT_TYPE!r}; "
                              f"drop --prompt-type {prompt_type}")
    if prompts_file is not None:
        return PromptList(CUSTOM_PROMPT_TYPE, tuple(read_prompts_file(prompts_file)), f"--prompts-file {prompts_file}")
    if prompts is not None:
        normalized = []
        for number, text in enumerate(prompts, start=1):
            if not isinstance(text, str) or not normalize_prompt(text):
                raise PromptListError(f"--prompts: prompt {number} ({text!r}) is empty")
            normalized.append(normalize_prompt(text))
        if not normalized:
            raise PromptListError("--prompts: no prompts given")
        return PromptList(CUSTOM_PROMPT_TYPE, tuple(normalized), "--prompts")
    prompt_type = prompt_type or default_prompt_type
    if prompt_type == CUSTOM_PROMPT_TYPE:
        raise PromptListError(f"prompt type {CUSTOM_PROMPT_TYPE!r} takes its prompts from --prompts \"A cat ...\" "
                              "or --prompts-file FILE")
    try:
        return PromptList(prompt_type, tuple(get_prompts(prompt_type)), f"--prompt-type {prompt_type}")
    except ValueError as error:
        raise PromptListError(str(error)) from None


def add_prompt_arguments(parser, *, default_prompt_type: str = "demo") -> None:
    """``--prompt-type`` / ``--prompts`` / ``--prompts-file`` on an argparse parser; read them with
    :func:`prompts_from_args`. ``--prompt-type`` defaults to None so that a clash can be told apart."""
    parser.add_argument("--prompt-type", default=None, choices=ALL_PROMPT_TYPES,
                        help=f"prompt set (default {default_prompt_type}); {CUSTOM_PROMPT_TYPE} for --prompts / "
                             f"--prompts-file")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompts", nargs="+", metavar="PROMPT", default=None,
                       help=f"free-text prompts instead of a prompt set (prompt type {CUSTOM_PROMPT_TYPE!r})")
    group.add_argument("--prompts-file", default=None, metavar="FILE",
                       help="a file of prompts, one per line (empty lines and # comments are skipped)")


def prompts_from_args(args, *, default_prompt_type: str = "demo") -> PromptList:
    """:func:`resolve_prompts` of the flags added by :func:`add_prompt_arguments`."""
    return resolve_prompts(args.prompt_type, args.prompts, args.prompts_file,
                           default_prompt_type=default_prompt_type)
