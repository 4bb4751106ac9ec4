"""The rule-based shapes planner (shapes/planner.py), the shapes benchmark (--prompt-type shapes) and the
shipped cache cache/cache_shapes_v0.1_rule-based.json."""
from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prompt import BENCHMARK_PROMPT_TYPES, PROMPT_TYPES, get_benchmark, get_prompts
from shapes import world
from shapes.planner import (PLANNER_NAME, CaptionParseError, build_check, build_planner_cache, parse_caption,
                            plan_reply, plan_scene)
from utils.cache import cache_path, load_cache_entries, serialize_cache
from utils.layout import parse_layout, resample_boxes
from utils.predicates import DynamicSpatialCheck, score_layout

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CACHE = REPO / "cache" / "cache_shapes_v0.1_rule-based.json"


def _sampled_scenes(count: int):
    rng = np.random.default_rng(2026)
    return [world.sample_scene(rng, world.TASKS[i % len(world.TASKS)]) for i in range(count)]


def test_parse_caption_reads_every_sampled_caption():
    for scene in _sampled_scenes(400):
        plan = parse_caption(scene.caption)
        assert plan.task == scene.task
        assert plan.kinds == tuple((o.colour, o.shape) for o in scene.objects)
        assert plan.background in (None, scene.background)
        assert (plan.background is not None) == scene.caption.endswith(" background")


def _centre(box) -> np.ndarray:
    return np.asarray([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def test_planned_layouts_round_trip_and_pass_their_checks():
    """Plan -> reply text -> parse_layout: the layout is the planned scene's (to the reply's pixel grid),
    inside the frame, sized like the training data, without overlaps, and it passes the caption's check
    (vertical and diagonal motions, which no check judges, are checked here by their centres)."""
    for scene in _sampled_scenes(300):
        caption = scene.caption
        reply = plan_reply(caption)
        layout = parse_layout(reply, caption)
        planned = plan_scene(caption)
        assert layout.background == planned.background == (parse_caption(caption).background or layout.background)
        assert layout.phrases == tuple(o.phrase for o in planned.objects)
        assert np.allclose(resample_boxes(layout, 16), world.scene_boxes(planned), atol=1e-9)
        boxes = resample_boxes(layout, 6)                     # (objects, 6, 4)
        present = boxes.any(-1)
        assert (boxes[present] >= 0).all() and (boxes[present] <= 1).all(), caption
        sides = (boxes[..., 2] - boxes[..., 0])[present]
        assert sides.min() >= 0.85 * world.MIN_SIZE - 0.01 and sides.max() <= world.MAX_SIZE + 0.01, caption
        for f in range(6):
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i, f], boxes[j, f]
                    if present[i, f] and present[j, f]:
                        assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), caption
        check = build_check(caption)
        if check is not None:
            assert score_layout(check, layout), caption
        else:
            start, end = world.DIRECTIONS[parse_caption(caption).motion]
            moved = _centre(boxes[0, -1]) - _centre(boxes[0, 0])
            for axis in range(2):
                if start[axis] is not None:
                    assert np.sign(moved[axis]) == np.sign(end[axis] - start[axis]), caption


def test_planner_is_deterministic_and_occurrences_differ():
    caption = "two green triangles on a gray background"
    assert plan_reply(caption) == plan_reply(caption)
    assert plan_reply(caption, occurrence=1) != plan_reply(caption, occurrence=0)
    reply = plan_reply(caption)
    assert reply.startswith("Reasoning: ") and reply.endswith("\nBackground keyword: gray")
    assert "Frame 6: [{'id': 0, 'name': 'green triangle', 'box': [" in reply


@pytest.mark.parametrize("caption", [
    "", "a purple circle", "two red circle", "a red circles", "a red circle moving from the left to the left",
    "a red circle moving from the left of a blue square to its left", "a dog moving from the left to the right",
    "a red circle on a green background", "zero red circles",
])
def test_captions_outside_the_grammar_raise(caption):
    with pytest.raises(CaptionParseError, match="shapes grammar"):
        parse_caption(caption)


def test_shapes_benchmark_has_20_prompts_per_task():
    assert "shapes" in BENCHMARK_PROMPT_TYPES and "shapes" in PROMPT_TYPES
    benchmark = get_benchmark("shapes")
    assert len(benchmark) == 100 and len({item.prompt for item in benchmark}) == 100
    assert Counter(item.task for item in benchmark) == {task: 20 for task in world.TASKS}
    assert [item.task for item in benchmark] == [t for t in world.TASKS for _ in range(20)]
    assert sum(item.prompt.endswith(" background") for item in benchmark) == 25
    for item in benchmark:
        assert parse_caption(item.prompt).task == item.task
        assert item.check == build_check(item.prompt)
        assert all(q.startswith("a photo of a ") for q in item.check.queries)
    spatial = [item.check for item in benchmark if isinstance(item.check, DynamicSpatialCheck)]
    assert Counter(len(check.names) for check in spatial) == {1: 10, 2: 10}
    assert Counter(item.check.count for item in benchmark if item.task == "numeracy") == {1: 5, 2: 5, 3: 5, 4: 5}


def test_shipped_cache_is_what_the_planner_writes():
    assert cache_path("shapes", "v0.1", PLANNER_NAME, REPO / "cache") == SHIPPED_CACHE
    expected = serialize_cache(build_planner_cache(get_prompts("shapes")))
    assert SHIPPED_CACHE.read_text(encoding="utf-8") == expected
    assert list(load_cache_entries(SHIPPED_CACHE)) == get_prompts("shapes")


def _load_script(name: str):
    """A script of scripts/ as a module, registered so that its dataclasses resolve."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_stage_one_scores_100_percent_on_the_shipped_cache(capsys):
    eval_stage_one = _load_script("eval_stage_one")
    status = eval_stage_one.main(["--prompt-type", "shapes", "--model", PLANNER_NAME, "--template_version", "v0.1",
                                  "--cache-dir", str(REPO / "cache")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "overall              100    100  100.00" in out


def test_plan_shapes_script_check(tmp_path, capsys):
    plan_shapes = _load_script("plan_shapes")
    assert plan_shapes.main(["--check", "--cache-dir", str(REPO / "cache")]) == 0
    assert plan_shapes.main(["--cache-dir", str(tmp_path)]) == 0
    assert (tmp_path / SHIPPED_CACHE.name).read_bytes() == SHIPPED_CACHE.read_bytes()
    assert plan_shapes.main(["--prompts", "a red circle", "a red circle", "--cache-dir", str(tmp_path)]) == 0
    custom = load_cache_entries(tmp_path / "cache_custom_v0.1_rule-based.json")
    assert len(custom["a red circle"]) == 2
    assert plan_shapes.main(["--prompts", "a purple circle", "--cache-dir", str(tmp_path)]) == 2
    assert "shapes grammar" in capsys.readouterr().err
