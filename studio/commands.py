"""The generate.py command lines that reproduce a studio result (pure: no project imports).

The contract with generate.py (README, "Stage 2"): ``--layout-file PATH`` generates the layout stored
in a ``layout.json`` for its prompt, ``--prompts "..."`` takes free-text prompts, and a single prompt
(index 0) with ``--seed_offset S`` gets seed S (``seed = prompt_index + 6789 * repeat + seed_offset``).
Flags are written only where they differ from generate.py's defaults, except the seed and the steps,
which are always spelled out. ``--control F ...`` names the layout control families when the caller's set
is not the run-model's own (``--control none``: the empty set).

Each command is split into ``config_argv`` (how to generate: run-model, seed, steps, controls, guidance, device)
and the rest (what to generate and where), because the studio builds its configs by handing
``config_argv`` to the parser of generate.py's settings flags (``generation.settings``).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Mapping, Sequence

GENERATE_SCRIPT = "generate.py"


@dataclass(frozen=True)
class CommandSettings:
    """The settings that both commands of a studio run share."""

    seed: int
    num_inference_steps: int
    device: str | None = None
    dtype: str | None = None
    model_path: str | None = None


@dataclass(frozen=True)
class GenerateCommand:
    config_argv: tuple[str, ...]     # flags that decide how the video is made
    target_argv: tuple[str, ...]     # --layout-file / --prompts and --output-dir

    @property
    def argv(self) -> tuple[str, ...]:
        """``python generate.py ...`` as an argument list."""
        return ("python", GENERATE_SCRIPT, *self.config_argv, *self.target_argv)


def format_flag_value(value: float | int | str) -> str:
    """A value as generate.py's parser reads it back exactly: ints as ints, floats by repr."""
    if isinstance(value, bool):
        raise TypeError(f"flag values are numbers or strings, found the bool {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _shared_argv(run_model: str, settings: CommandSettings) -> list[str]:
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int):
        raise ValueError(f"the seed must be an integer, found {settings.seed!r}")
    argv = ["--run-model", run_model, "--seed_offset", str(settings.seed),
            "--num_inference_steps", str(settings.num_inference_steps)]
    for flag, value in (("--device", settings.device), ("--dtype", settings.dtype),
                        ("--model-path", settings.model_path)):
        if value:
            argv += [flag, str(value)]
    return argv


def build_lvd_command(run_model: str, layout_file: str, settings: CommandSettings,
                      guidance_flags: Mapping[str, float | int], output_dir: str,
                      controls: Sequence[str] | None = None) -> GenerateCommand:
    """``python generate.py --run-model M --seed_offset S --num_inference_steps N [--control F ...]
    [--<guidance> V ...] --layout-file L --output-dir O``; guidance flags in the given order. ``controls``:
    None for the run-model's families (no flag), else the families to run (empty: ``--control none``)."""
    config = _shared_argv(run_model, settings)
    if controls is not None:
        if isinstance(controls, str):
            raise TypeError(f"controls is a sequence of family names, found the string {controls!r}")
        config += ["--control", *(controls or ["none"])]
    for name, value in guidance_flags.items():
        config += [f"--{name}", format_flag_value(value)]
    return GenerateCommand(tuple(config), ("--layout-file", layout_file, "--output-dir", output_dir))


def build_baseline_command(run_model: str, prompt: str, settings: CommandSettings, output_dir: str,
                           corrector_off_steps: int | None = None) -> GenerateCommand:
    """The unguided video of the same prompt and seed: ``--prompts "<prompt>"``, no layout. Wan baselines get
    ``--corrector-off-steps K``: the LVD arm's sampler, so that the two differ by the guidance only."""
    config = _shared_argv(run_model, settings)
    if corrector_off_steps is not None:
        config += ["--corrector-off-steps", str(corrector_off_steps)]
    return GenerateCommand(tuple(config), ("--prompts", prompt, "--output-dir", output_dir))


def format_command(argv: Sequence[str]) -> str:
    """One shell line, quoted so that ``shlex.split`` gives ``argv`` back."""
    return shlex.join(argv)


def parse_command(line: str) -> list[str]:
    """The inverse of :func:`format_command` (for tests and scripts that rerun a shown command)."""
    return shlex.split(line)
