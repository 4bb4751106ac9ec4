"""models/: tokenizer, run-model registry, tiny random models, loading and missing-weight errors."""
from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from pathlib import Path

import pytest
import torch

from models import tiny
from models.devices import resolve_device, resolve_dtype
from models.hub import MissingWeightsError, resolve_model_folder, select_hub_files
from models.loading import load_video_model
from models.registry import (LVD_GUIDED_LAYERS, RUN_MODELS, RunModelError, get_run_model, run_model_names,
                             validate_num_frames)
from models.tokenizer import TokenizerFilesError, build_clip_tokenizer, find_clip_bpe_file

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "model-configs"
MS_CONFIG_DIR = MODEL_CONFIGS / "damo-vilab__text-to-video-ms-1.7b"
ZS_CONFIG_DIR = MODEL_CONFIGS / "cerspense__zeroscope_v2_576w"
needs_shared = pytest.mark.skipif(not MS_CONFIG_DIR.is_dir(), reason="needs ../shared/model-configs (absent in CI)")

PROMPT = "A realistic lively video of a scene with a red car and a blue cat, street background"
PROMPT_IDS = [49406, 320, 16157, 19663, 1455, 539, 320, 3562, 593, 320, 736, 1615, 537, 320, 1746, 2368, 267,
              2012, 5994, 49407]
# Spatial cross-attention in stock diffusers UNet3D: (down|up)_blocks.<i>.attentions.<j>...attn2. A bare
# substring match on "attentions" would also hit temp_attentions (temporal self-attention).
SPATIAL_CROSS_ATTN = re.compile(r"^(down_blocks|up_blocks)\.\d+\.attentions\.\d+\.transformer_blocks\.0\.attn2$")


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_gives_the_real_ids():
    tokenizer = build_clip_tokenizer()
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS
    assert len(tokenizer) == 49408
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("!", 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77
    padded = tokenizer(["a red car", "word " * 100], padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True).input_ids
    assert padded[0][:5] == [49406, 320, 736, 1615, 49407] and set(padded[0][5:]) == {0} and len(padded[0]) == 77
    assert len(padded[1]) == 77 and padded[1][-1] == 49407  # truncation keeps EOS
    assert build_clip_tokenizer() is tokenizer  # cached


def test_tokenizer_missing_file_says_how_to_install(monkeypatch):
    import models.tokenizer as tokenizer_module
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerFilesError, match="pip install --no-deps open-clip-torch"):
        find_clip_bpe_file()


@needs_shared
def test_tokenizer_equals_the_shared_modelscope_tokenizer():
    from models.tokenizer import build_clip_vocab_and_merges, load_tokenizer

    folder = MS_CONFIG_DIR / "tokenizer"
    vocab, merges = build_clip_vocab_and_merges(find_clip_bpe_file())
    assert vocab == json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert [" ".join(pair) for pair in merges] == [line for line in merge_lines if line]
    real = load_tokenizer(folder)
    ours = build_clip_tokenizer()
    assert real.model_max_length == 77 and real.pad_token_id == 0
    for text in [PROMPT, "Hello   World!! it's a dog's life, 123 ÄÖü 中文 🙂", "dull, gray, unrealistic"]:
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        assert ours(text, **kwargs).input_ids == real(text, **kwargs).input_ids


# --- registry --------------------------------------------------------------------------------------


def test_registry_entries():
    expected = {  # name: (method, model_id, height, width, default frames, min frames)
        "lvd_zeroscope": ("lvd", "cerspense/zeroscope_v2_576w", 320, 576, 24, 24),
        "lvd_modelscope256": ("lvd", "damo-vilab/text-to-video-ms-1.7b", 256, 256, 16, 2),
        "lvd_modelscope512": ("lvd", "damo-vilab/text-to-video-ms-1.7b", 512, 512, 16, 2),
        "zeroscope": ("baseline", "cerspense/zeroscope_v2_576w", 320, 576, 24, 24),
        "modelscope_256": ("baseline", "damo-vilab/text-to-video-ms-1.7b", 256, 256, 16, 2),
        "modelscope": ("baseline", "damo-vilab/text-to-video-ms-1.7b", 512, 512, 16, 2),
        "lvd_tiny": ("lvd", None, 128, 128, 8, 2),
        "baseline_tiny": ("baseline", None, 128, 128, 8, 2),
    }
    assert set(expected) <= set(run_model_names())
    for name, values in expected.items():
        spec = get_run_model(name)
        assert (spec.method, spec.model_id, spec.height, spec.width, spec.default_num_frames,
                spec.min_num_frames) == values
        assert spec.guided_layers == (LVD_GUIDED_LAYERS if spec.method == "lvd" else ())
        assert spec.tiny == (spec.model_id is None)
        assert spec.height % 8 == 0 and spec.width % 8 == 0
    assert get_run_model("lvd_zeroscope").latent_height == 40 and get_run_model("lvd_zeroscope").latent_width == 72
    assert len(LVD_GUIDED_LAYERS) == 6 and all(SPATIAL_CROSS_ATTN.match(p) for p in LVD_GUIDED_LAYERS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_run_model("lvd_tiny").height = 64  # type: ignore[misc]


def test_get_run_model_errors_list_the_choices():
    with pytest.raises(RunModelError, match="broken.*lvd_modelscope256") as info:
        get_run_model("lvd")
    assert "lvd_zeroscope" in str(info.value)
    with pytest.raises(RunModelError, match="Did you mean 'lvd_modelscope256'") as info:
        get_run_model("lvd_modelscope_256")
    assert all(spec.name in str(info.value) for spec in RUN_MODELS)
    assert isinstance(info.value, ValueError)


def test_validate_num_frames():
    zeroscope, modelscope = get_run_model("lvd_zeroscope"), get_run_model("lvd_modelscope256")
    assert validate_num_frames(zeroscope, None) == 24
    assert validate_num_frames(zeroscope, 32) == 32
    with pytest.raises(RunModelError, match=">= 24, got 16"):
        validate_num_frames(zeroscope, 16)
    with pytest.raises(RunModelError, match=">= 24"):
        validate_num_frames(get_run_model("zeroscope"), 8)
    assert validate_num_frames(modelscope, None) == 16 and validate_num_frames(modelscope, 8) == 8
    for bad in (0, -3, 2.5, True):
        with pytest.raises(RunModelError):
            validate_num_frames(modelscope, bad)


def test_num_frames_outside_what_a_video_model_takes_are_rejected():
    # Issue 17, item 26: one frame is a picture, 10000 a typo that would fail late.
    for name, low in (("lvd_modelscope256", 1), ("lvd_tiny", 1), ("lvd_wan_tiny", 1)):
        spec = get_run_model(name)
        with pytest.raises(RunModelError, match=f"needs num_frames >= {spec.min_num_frames}, got {low}"):
            validate_num_frames(spec, low)
        with pytest.raises(RunModelError, match="<= 256, got 10000"):
            validate_num_frames(spec, 10000)
    assert validate_num_frames(get_run_model("lvd_tiny"), 2) == 2
    assert validate_num_frames(get_run_model("lvd_wan_tiny"), 5) == 5


# --- tiny models -----------------------------------------------------------------------------------


def test_tiny_components_are_deterministic_per_seed():
    rng_before = torch.get_rng_state()
    first, again, other = tiny.build_tiny_components(0), tiny.build_tiny_components(0), tiny.build_tiny_components(1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the caller's RNG alone
    for name in ("unet", "vae", "text_encoder"):
        assert _state_dicts_equal(first[name], again[name]), name
        assert not _state_dicts_equal(first[name], other[name]), name


def test_tiny_unet_has_exactly_the_six_guided_layers(tiny_model):
    unet = tiny_model.unet
    paths = [key.removesuffix(".processor") for key in unet.attn_processors]
    for path in LVD_GUIDED_LAYERS:
        assert path in paths
        module = unet.get_submodule(path)
        assert module.is_cross_attention and module.to_k.in_features == tiny.TINY_TEXT_HIDDEN_SIZE
        assert "temp_attentions" not in path and "transformer_in" not in path
    temporal = [p for p in paths if "temp_attentions" in p or p.startswith("transformer_in")]
    assert temporal and not set(temporal) & set(LVD_GUIDED_LAYERS)
    assert all(not unet.get_submodule(p).is_cross_attention for p in temporal)
    # Heads of 8 channels: 4 heads at level 1 (32 channels), 8 at level 2 (64), like ModelScope's 10 and 20.
    heads = [unet.get_submodule(p).heads for p in LVD_GUIDED_LAYERS]
    assert heads == [4, 8, 8, 8, 8, 4]


def test_tiny_guided_maps_are_half_and_quarter_of_the_latent(tiny_model):
    spec = tiny_model.spec
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [tiny_model.unet.get_submodule(path).register_forward_hook(
        lambda module, args, kwargs, output, path=path: seen.__setitem__(path, tuple(args[0].shape)),
        with_kwargs=True) for path in spec.guided_layers]
    try:
        num_frames = 2
        latents = torch.randn(1, 4, num_frames, spec.latent_height, spec.latent_width)  # (B, C, F, h, w)
        with torch.no_grad():
            tiny_model.unet(latents, 999, torch.randn(1, 77, tiny.TINY_TEXT_HIDDEN_SIZE))
    finally:
        for hook in hooks:
            hook.remove()
    # Spatial attention sees (B*F, h*w, C): 8x8 at levels down 1 / up 2, 4x4 at down 2 / up 1.
    assert [seen[p][1] for p in spec.guided_layers] == [64, 16, 16, 16, 16, 64]
    assert all(seen[p][0] == num_frames for p in spec.guided_layers)


def test_tiny_model_is_frozen_eval_fp32_cpu(tiny_model):
    assert tiny_model.device == torch.device("cpu") and tiny_model.dtype == torch.float32
    for module in (tiny_model.unet, tiny_model.vae, tiny_model.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert tiny_model.vae.use_slicing and tiny_model.vae.config.scaling_factor == 0.18215
    assert tiny_model.text_encoder.config.vocab_size == 49408
    assert tiny_model.make_scheduler() is not tiny_model.scheduler


def test_dpm_timesteps_for_40_steps(tiny_model):
    scheduler = tiny_model.make_scheduler()
    scheduler.set_timesteps(40)
    expected = [round(999 - 999 * i / 40) for i in range(40)]  # round(linspace(0, 999, 41)) reversed, no 0
    assert scheduler.timesteps.tolist() == expected
    assert expected[:3] == [999, 974, 949] and expected[-2:] == [50, 25] and 500 in expected
    config = scheduler.config
    assert (config.algorithm_type, config.solver_order, config.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert config.lower_order_final and config.timestep_spacing == "linspace" and config.final_sigmas_type == "zero"
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert not config.use_karras_sigmas and not config.thresholding and config.prediction_type == "epsilon"


def test_saved_tiny_model_reloads_with_the_same_outputs(tmp_path, tiny_model):
    folder = tiny.save_tiny_model(tmp_path / "tiny-model")
    assert {p.name for p in folder.iterdir()} == {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                                  "model_index.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(FileExistsError):
        tiny.save_tiny_model(folder)
    reloaded = load_video_model(get_run_model("lvd_tiny"), model_path=folder, device="cpu")
    assert reloaded.source == str(folder)
    latents = torch.randn(2, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = reloaded.tokenizer(["a red car", ""], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert ids.tolist() == tiny_model.tokenizer(["a red car", ""], padding="max_length", max_length=77,
                                                 truncation=True, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        text = tiny_model.text_encoder(ids).last_hidden_state
        assert torch.equal(reloaded.text_encoder(ids).last_hidden_state, text)
        assert torch.equal(reloaded.unet(latents, 500, text).sample, tiny_model.unet(latents, 500, text).sample)
        frame_latents = latents[0].permute(1, 0, 2, 3)  # (F, 4, h, w)
        assert torch.equal(reloaded.vae.decode(frame_latents).sample, tiny_model.vae.decode(frame_latents).sample)
    assert dict(reloaded.scheduler.config) == dict(tiny_model.scheduler.config)


def test_model_in_hf_cache_layout_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "lvd-tests/tiny-cached"
    entry = tmp_path / ("models--" + model_id.replace("/", "--"))
    commit = "0" * 40
    tiny.save_tiny_model(entry / "snapshots" / commit, seed=3)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    spec = dataclasses.replace(get_run_model("lvd_tiny"), name="cached_tiny", model_id=model_id, tiny=False)
    model = load_video_model(spec, device="cpu", cache_dir=tmp_path)
    assert _state_dicts_equal(model.unet, tiny.build_tiny_unet(3))


# --- missing weights -------------------------------------------------------------------------------


def _check_missing(spec, monkeypatch, tmp_path, **kwargs) -> str:
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as info:
        load_video_model(spec, device="cpu", **kwargs)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert spec.model_id in message and "hf download" in message and "--model-path" in message
    return message


def test_missing_weights_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    spec = get_run_model("lvd_modelscope256")
    message = _check_missing(spec, monkeypatch, tmp_path)
    assert str(tmp_path / "models--damo-vilab--text-to-video-ms-1.7b") in message and "HF_HUB_OFFLINE" in message


def test_missing_weights_without_network_fail_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # A closed local port: "no network" without depending on this machine's connectivity.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    spec = get_run_model("lvd_zeroscope")
    message = _check_missing(spec, monkeypatch, tmp_path, cache_dir=tmp_path)
    assert str(tmp_path / "models--cerspense--zeroscope_v2_576w") in message and "unreachable" in message


def test_hub_that_never_answers_fails_within_the_timeout(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(MissingWeightsError, match="lvd-tests/none"):
            resolve_model_folder("lvd-tests/none", cache_dir=tmp_path, hub_timeout_s=0.5)
        assert time.monotonic() - start < 3


def test_missing_weights_in_model_path(tmp_path):
    spec = get_run_model("lvd_modelscope256")
    message = _check_missing(spec, None, tmp_path, model_path=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message
    folder = tiny.save_tiny_model(tmp_path / "no-weights")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    message = _check_missing(spec, None, tmp_path, model_path=folder)
    assert str(folder) in message and "unet/*.safetensors" in message


def test_select_hub_files_takes_one_weight_format_per_folder():
    listing = ["model_index.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json",
               "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
               "scheduler/scheduler_config.json"]
    assert select_hub_files(listing) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.bin", "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"])


# --- device and dtype ------------------------------------------------------------------------------


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp32", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "cuda") == torch.float16 and resolve_dtype("torch.float16", "cuda")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_tiny_model_in_bf16(tiny_model):
    model = load_video_model(get_run_model("baseline_tiny"), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.spec.method == "baseline"
    for low, full in zip(model.unet.parameters(), tiny_model.unet.parameters()):
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), full, rtol=1e-2, atol=1e-3)  # same weights, rounded


# --- full-size architectures (meta device, no memory) ----------------------------------------------


@needs_shared
@pytest.mark.parametrize("config_dir", [MS_CONFIG_DIR, ZS_CONFIG_DIR], ids=["modelscope", "zeroscope"])
def test_full_size_configs_have_the_guided_layers_of_spec_4_1(config_dir):
    model = tiny.build_random_model_from_configs(config_dir, device="meta")
    unet = model.unet
    assert next(unet.parameters()).device.type == "meta"
    paths = [key.removesuffix(".processor") for key in unet.attn_processors]
    assert set(LVD_GUIDED_LAYERS) <= set(paths)
    for path, channels in zip(LVD_GUIDED_LAYERS, (640, 1280, 1280, 1280, 1280, 640)):
        attention = unet.get_submodule(path)
        assert attention.to_q.in_features == channels and attention.to_k.in_features == 1024
        assert attention.heads == channels // 64 and attention.inner_dim // attention.heads == 64
    # Parameter counts from shared/model-configs/SOURCES.md.
    assert sum(p.numel() for p in unet.parameters()) == 1_411_233_860
    assert sum(p.numel() for p in model.text_encoder.parameters()) == 340_387_840
    assert sum(p.numel() for p in model.vae.parameters()) == 83_653_863
    assert model.tokenizer("a red car").input_ids == [49406, 320, 736, 1615, 49407]
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(40)
    assert scheduler.timesteps[:2].tolist() == [999, 974]


def test_random_model_from_configs_materialises_on_cpu(tmp_path):
    # A saved tiny model doubles as a config folder; same seed and configs give the tiny weights.
    folder = tiny.save_tiny_model(tmp_path / "configs", seed=5)
    model = tiny.build_random_model_from_configs(folder, dtype="fp32", device="cpu", seed=5)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert _state_dicts_equal(model.unet, tiny.build_tiny_unet(5))
    assert _state_dicts_equal(model.text_encoder, tiny.build_tiny_text_encoder(5))
    assert model.tokenizer("a red car").input_ids == [49406, 320, 736, 1615, 49407]
    assert not any(p.requires_grad for p in model.unet.parameters()) and model.vae.use_slicing


def test_missing_weights_messages_name_the_cli_flag_not_a_library_parameter(tmp_path):
    # Issue 17, item 15: messages ended with "(model_path=DIR)".
    for model_id in ("lvd-tests/none", None):
        with pytest.raises(MissingWeightsError) as info:
            resolve_model_folder(model_id, model_path=tmp_path / "absent", path_flag="--detector-path")
        assert "--detector-path DIR" in str(info.value) and "model_path" not in str(info.value)


def test_cpu_threads_default_to_one_for_tiny_models_unless_asked():
    # Issue 17, item 7: torch's default threads made tiny models crawl on a busy machine.
    from models.devices import choose_cpu_threads

    assert choose_cpu_threads(None, small_model=True, environ={}) == 1
    assert choose_cpu_threads(None, small_model=False, environ={}) is None  # torch's default
    assert choose_cpu_threads(3, small_model=True, environ={"OMP_NUM_THREADS": "2"}) == 3  # --threads wins
    assert choose_cpu_threads(None, small_model=True, environ={"OMP_NUM_THREADS": "2"}) is None  # torch follows it
    with pytest.raises(ValueError):
        choose_cpu_threads(0, small_model=True)


def test_the_shipped_shapes_models_count_as_small_for_the_cpu_thread_choice():
    # The README's first command runs lvd_shapes: 82 s on one thread, 183 s on torch's two (docs/BENCHMARKS.md).
    from models.registry import RUN_MODELS_BY_NAME as specs

    assert specs["lvd_shapes"].small and specs["baseline_shapes"].small and specs["lvd_tiny"].small
    assert not specs["lvd_zeroscope"].small and not specs["lvd_wan2.1-1.3b"].small
