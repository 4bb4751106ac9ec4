"""Shared helpers of the studio tests (tests/test_studio*.py); no conftest (the lead owns it)."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CACHE = REPO / "cache" / "cache_demo_v0.1_handwritten.json"
DEMO_PROMPT = "A bear walks from the left to the right"
# A few steps keep a tiny run at about a second; guidance runs in all of them.
FAST_STEPS = 3


def copy_demo_cache(cache_dir: Path) -> Path:
    """A private copy of cache/ with the demo cache (tests never write the repository's cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(DEMO_CACHE, cache_dir / DEMO_CACHE.name))


def studio_settings(tmp_path: Path, **overrides):
    from studio import backend

    cache_dir = tmp_path / "cache"
    if not (cache_dir / DEMO_CACHE.name).exists():
        copy_demo_cache(cache_dir)
    values = {"cache_dir": cache_dir, "output_dir": tmp_path / "img_generations"}
    values.update(overrides)
    return backend.StudioSettings(**values)


def demo_layout():
    from studio import backend

    return backend.plan_from_cache(DEMO_CACHE, DEMO_PROMPT).layout


def direct_library_video(layout_file: Path, run_model: str, seed: int, steps: int, guidance_flags: dict):
    """The video of a saved layout.json straight from the library (README "Using it as a library"),
    built without any studio code: what the studio's result must equal bit for bit."""
    import json

    from generation.config import GuidanceConfig, SamplingConfig
    from generation.sampling import generate_video
    from models.loading import load_video_model
    from models.registry import get_run_model
    from utils.layout import build_condition, layout_from_dict

    spec = get_run_model(run_model)
    model = load_video_model(spec)
    data = json.loads(layout_file.read_text())
    layout = layout_from_dict(data["layout"])
    condition = build_condition(layout, spec.default_num_frames, tokenizer=model.tokenizer)
    sampling = SamplingConfig(height=spec.height, width=spec.width, num_frames=spec.default_num_frames,
                              num_inference_steps=steps)
    guidance = GuidanceConfig(guided_layers=spec.guided_layers, **guidance_flags)
    return generate_video(model, layout.prompt, sampling, seed, condition=condition, guidance=guidance).frames
