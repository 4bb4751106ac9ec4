"""Several videos per forward (--batch-size) give each video's batch-1 result, up to float tolerance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from generation.config import GuidanceConfig, SamplingConfig
from generation.sampling import VideoRequest, generate_video, generate_videos
from models.gligen import GligenConfig
from utils.layout import build_condition, parse_layout

SAMPLING = SamplingConfig(height=128, width=128, num_frames=4, num_inference_steps=4)


def _reply(name: str, start_px: int, second: str | None = None) -> str:
    lines = []
    for k in range(6):
        objects = [f"{{'id': 0, 'name': '{name}', 'box': [{start_px + 40 * k}, 200, 120, 100]}}"]
        if second:
            objects.append(f"{{'id': 1, 'name': '{second}', 'box': [300, {60 + 20 * k}, 80, 80]}}")
        lines.append(f"Frame {k + 1}: [{', '.join(objects)}]")
    return "Reasoning: test.\n\n" + "\n".join(lines) + "\nBackground keyword: street"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def _requests(tokenizer):
    layouts = [("A red car drives along a road", _reply("red car", 10)),
               ("A cat and a flying bird in a garden", _reply("cat", 100, "flying bird")),
               ("A dog runs to the left", _reply("dog", 300))]
    requests = []
    for seed, (prompt, reply) in enumerate(layouts):
        condition = build_condition(parse_layout(reply, prompt), SAMPLING.num_frames, tokenizer)
        requests.append(VideoRequest(prompt=prompt, seed=10 + seed, condition=condition))
    return requests


# Both stop rules generate several guided videos: CI's slow pass (the default suite stays < 3 min).
@pytest.mark.slow
@pytest.mark.parametrize("stop_rule", ["carried", "per-step"])
def test_batched_guided_videos_equal_batch_one(model, stop_rule):
    requests = _requests(model.tokenizer)
    # A threshold between the videos' first energies, so that they stop guiding at different
    # iterations: the per-video decisions inside a batch are what is tested.
    probe = GuidanceConfig(max_index_step=1, max_iter=1, loss_threshold=0.0)
    first = [generate_video(model, r.prompt, SAMPLING, r.seed, condition=r.condition, guidance=probe)
             .guidance_log[0].energy for r in requests]
    guidance = GuidanceConfig(max_index_step=3, max_iter=3, loss_threshold=(min(first) + max(first)) / 2,
                              stop_rule=stop_rule)
    batched = generate_videos(model, requests, SAMPLING, guidance=guidance)
    for request, result in zip(requests, batched):
        alone = generate_video(model, request.prompt, SAMPLING, request.seed, condition=request.condition,
                               guidance=guidance)
        assert result.seed == alone.seed and result.prompt == alone.prompt
        assert [(r.step, r.iteration) for r in result.guidance_log] == [(r.step, r.iteration)
                                                                          for r in alone.guidance_log]
        np.testing.assert_allclose([r.energy for r in result.guidance_log],
                                   [r.energy for r in alone.guidance_log], rtol=1e-4)
        torch.testing.assert_close(result.latents, alone.latents, atol=1e-4, rtol=1e-4)
    counts = [len(result.guidance_log) for result in batched]
    assert len(set(counts)) > 1, counts


@pytest.mark.slow  # generates videos: CI's slow pass (the default suite stays < 3 min)
def test_batched_unguided_and_mixed_layouts(model):
    requests = _requests(model.tokenizer)
    empty = build_condition(parse_layout("Frame 1: []\nFrame 2: []\nFrame 3: []\nFrame 4: []\nFrame 5: []\n"
                                         "Frame 6: []\nBackground keyword: sky", "An empty sky"),
                            SAMPLING.num_frames, model.tokenizer)
    requests.append(VideoRequest(prompt="An empty sky", seed=99, condition=empty))
    guidance = GuidanceConfig(max_index_step=2, max_iter=2, loss_threshold=0.0)
    batched = generate_videos(model, requests, SAMPLING, guidance=guidance)
    assert batched[-1].guidance_log == []  # no objects: unguided, the others still guided
    alone = generate_video(model, "An empty sky", SAMPLING, 99, condition=empty, guidance=guidance)
    torch.testing.assert_close(batched[-1].latents, alone.latents, atol=1e-4, rtol=1e-4)
    assert all(len(result.guidance_log) == 4 for result in batched[:-1])


@pytest.mark.slow  # an equivalence test over several runs: CI's slow pass (the default suite stays < 3 min)
def test_batched_gligen_equals_batch_one(tiny_grounded_model):
    grounded = tiny_grounded_model
    requests = _requests(grounded.tokenizer)[:2]
    gligen = GligenConfig(scheduled_sampling_beta=0.5)
    batched = generate_videos(grounded, requests, SAMPLING, gligen=gligen)
    for request, result in zip(requests, batched):
        alone = generate_video(grounded, request.prompt, SAMPLING, request.seed, condition=request.condition,
                               gligen=gligen)
        torch.testing.assert_close(result.latents, alone.latents, atol=1e-4, rtol=1e-4)
