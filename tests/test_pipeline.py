"""`generation.pipeline.LVDPipeline`: the diffusers-style entry point gives generate.py's video bit for bit."""
from __future__ import annotations

import joblib
import numpy as np
import pytest

import generate
from generation.pipeline import LVDPipeline, _resolve
from models.registry import RunModelError
from studio_fixtures import DEMO_PROMPT, demo_layout
from utils.io import atomic_write_json
from utils.layout import layout_to_dict

GUIDED = {"max_index_step": 2, "loss_threshold": 0.0, "max_iter": 1}   # every step of a short run guided


@pytest.mark.parametrize("run_model", ["lvd_tiny", "lvd_wan_tiny",
                                       pytest.param("baseline_tiny", marks=pytest.mark.slow)])
def test_the_pipeline_equals_generate_py_bit_for_bit(tmp_path, run_model):
    layout = demo_layout()
    layout_file = tmp_path / "layout.json"
    atomic_write_json(layout_file, {"prompt": layout.prompt, "layout": layout_to_dict(layout)})
    guided = run_model != "baseline_tiny"
    flags = [x for name, value in GUIDED.items() for x in (f"--{name}", str(value))] if guided else []
    target = ["--layout-file", str(layout_file)] if guided else ["--prompts", DEMO_PROMPT]
    argv = ["--run-model", run_model, "--seed_offset", "3", "--num_inference_steps", "3", *flags, *target,
            "--output-dir", str(tmp_path / "out")]
    assert generate.main(argv) == 0
    expected = joblib.load(next((tmp_path / "out").rglob("video_0.joblib")))

    pipe = LVDPipeline.from_pretrained(run_model)
    if guided:
        output = pipe(layout=layout_file, seed=3, num_inference_steps=3, **GUIDED)
        assert len(output.guidance_log) == 2 and output.condition.phrases == ("bear",)
    else:
        output = pipe(DEMO_PROMPT, seed=3, num_inference_steps=3)
    assert output.frames.dtype == np.uint8 and np.array_equal(output.frames, expected)


def test_from_pretrained_names_and_settings_say_what_is_expected(tmp_path):
    assert _resolve("cerspense/zeroscope_v2_576w", None)[0].name == "lvd_zeroscope"
    assert _resolve("lvd_wan_tiny", None) == (_resolve("lvd_wan_tiny", None)[0], None)
    with pytest.raises(RunModelError, match="say which run-model"):
        _resolve(str(tmp_path), None)
    with pytest.raises(RunModelError, match="unknown run-model 'lvd_tinyy'"):
        _resolve("lvd_tinyy", None)
    pipe = LVDPipeline.from_pretrained("lvd_tiny")
    with pytest.raises(TypeError, match="unknown setting 'loss_scal'"):
        pipe(layout=demo_layout(), loss_scal=3)
    with pytest.raises(ValueError, match="needs a layout"):
        pipe("A bear")
    assert pipe.configs(corrector_off_steps=None).sampling.corrector_off_steps == 0
