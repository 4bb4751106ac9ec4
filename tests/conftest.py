"""Shared fixtures and the ``slow`` marker.

- Tiny random-weight models (the real classes, shrunken configs; models/tiny.py) are built once per
  session (once per worker under ``-n auto``, so tests share no files outside ``tmp_path``): every test
  module that needs one asks for ``tiny_model`` / ``tiny_grounded_model``. Tests must not change their
  weights (processors are installed by context managers that restore them).
- ``@pytest.mark.slow`` tests (subprocess launches, multi-process runs, long equivalence runs) are
  skipped, with that reason, unless ``--run-slow`` is given; ``.ci/run`` runs them in a second pass.
- Torch runs on one thread in the test process (``LVD_TEST_THREADS`` overrides): tiny models gain
  nothing from a second thread, and on a busy 2-core machine two threads spin. A test that changes the
  thread count gets it restored after it, so nothing leaks into the next test.
- MKL runs in strict conditional-numerical-reproducibility mode (``MKL_CBWR=AUTO,STRICT``, set before torch
  loads it): otherwise its kernels round by the memory alignment of their operands, and on AVX-512 Xeons one
  Linear on equal inputs and weights gave 1e-6 apart in two loaded copies of a model, which the equivalence
  tests' tolerances (loop == pipeline, batch == batch 1) do not allow for after a few steps.
- oneDNN's kernels are held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, likewise set before torch loads): on AVX-512
  CPUs its convolutions pick their blocking by batch size, and on an AVX-512 EPYC the rounding, grown over
  three guided steps, put one latent of a batch-2 guided video 1.1e-4 from its batch-1 twin (allowed: 1e-4).
"""
from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_THREADS = int(os.environ.get("LVD_TEST_THREADS", "1"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (CI runs them in a second pass)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI runs it: .ci/run)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def tiny_model():
    """The `lvd_tiny` model (seed 0, CPU, fp32), loaded as generate.py loads it."""
    from models.loading import load_video_model
    from models.registry import get_run_model

    return load_video_model(get_run_model("lvd_tiny"), device="cpu")


@pytest.fixture(scope="session")
def tiny_grounded_model():
    """The `lvd-gligen_tiny` model: the tiny UNet plus GLIGEN fusers and a position net (seed 0)."""
    from models.loading import load_video_model
    from models.registry import get_run_model

    return load_video_model(get_run_model("lvd-gligen_tiny"), device="cpu")


@pytest.fixture(scope="session")
def clip_tokenizer():
    """The real ModelScope / Zeroscope CLIP tokenizer, built offline."""
    from models.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()
