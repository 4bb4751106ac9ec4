"""Cross-attention recording (models/attention.py) on the tiny random-weight UNet3D.

Spec: LVD-REFERENCE.md 4.1 (the six guided layers, shapes, map sizes), 4.2 (explicit path, not
detached), 13 (stock UNet + our processor, SDPA elsewhere, no other change), 15.1 (early stop,
object-token columns only).
"""
from __future__ import annotations

import pytest
import torch

from models.attention import (AttentionRecorder, RecordingAttnProcessor, StopForward, check_guided_layers,
                              recording_attention, run_recorded_forward)
from models.registry import LVD_GUIDED_LAYERS

NUM_FRAMES = 3


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def inputs(model):
    """Batch of 2 (so batch*frames is visible in the shapes): latents (2, 4, F, 16, 16), text (2, 77, D)."""
    generator = torch.Generator().manual_seed(0)
    latent_size = model.spec.latent_height
    latents = torch.randn(2, 4, NUM_FRAMES, latent_size, latent_size, generator=generator)
    text = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor(500), text


def unet_output(unet, inputs) -> torch.Tensor:
    latents, timestep, text = inputs
    with torch.no_grad():
        return unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]


def expected_shape(unet, layer: str, batch_frames: int, latent_size: int) -> tuple[int, int, int, int]:
    """Spec 4.1 for this architecture: heads = channels / head size; level-i maps are latent / 2^i."""
    config = unet.config
    level, index = layer.split(".")[0], int(layer.split(".")[1])
    channels = list(config.block_out_channels)
    depth = len(channels) - 1 - index if level == "up_blocks" else index
    block_channels = (channels[::-1] if level == "up_blocks" else channels)[index]
    side = latent_size // 2 ** depth
    return batch_frames, block_channels // config.attention_head_dim, side * side, 77


def test_records_exactly_the_six_layers_with_the_spec_shapes(model, inputs):
    latents, timestep, text = inputs
    recorder = AttentionRecorder(LVD_GUIDED_LAYERS, stop_when_complete=False)
    leaf = latents.clone().requires_grad_(True)
    with recording_attention(model.unet, recorder), torch.enable_grad():
        maps = run_recorded_forward(model.unet, recorder, leaf, timestep, encoder_hidden_states=text)
    assert list(maps) == list(LVD_GUIDED_LAYERS)   # recorded in forward order; nothing temporal
    latent_size = latents.shape[-1]
    sides = set()
    for name, probs in maps.items():
        assert probs.shape == expected_shape(model.unet, name, 2 * NUM_FRAMES, latent_size), name
        sides.add(probs.shape[2])
        assert torch.allclose(probs.sum(dim=-1), torch.ones(()), atol=1e-5)  # softmax over the 77 tokens
        assert probs.requires_grad and probs.grad_fn is not None              # not detached (spec 4.2)
    assert sides == {(latent_size // 2) ** 2, (latent_size // 4) ** 2}
    # The tiny model's guided layers: 4 heads at level 1 and 8 at level 2 (ModelScope: 10 and 20).
    heads = [maps[name].shape[1] for name in LVD_GUIDED_LAYERS]
    assert heads[0] * 2 == heads[1] == heads[2] == heads[3] == heads[4] == heads[5] * 2
    # Gradients reach the latents through the recorded maps.
    (gradient,) = torch.autograd.grad(sum(m[..., 5].sum() for m in maps.values()), leaf)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_recording_leaves_the_unet_output_unchanged(model, inputs):
    latents, timestep, text = inputs
    plain = unet_output(model.unet, inputs)
    recorder = AttentionRecorder(LVD_GUIDED_LAYERS, stop_when_complete=False)
    with recording_attention(model.unet, recorder):
        installed_off = unet_output(model.unet, inputs)
        recorder.start()
        try:
            recorded_on = unet_output(model.unet, inputs)
        finally:
            recorder.stop()
        assert len(recorder.maps) == len(LVD_GUIDED_LAYERS)
    assert torch.allclose(installed_off, plain, atol=1e-5, rtol=0)
    assert torch.allclose(recorded_on, plain, atol=1e-5, rtol=0)
    assert torch.equal(unet_output(model.unet, inputs), plain)   # and after the processors are restored


def test_processors_are_installed_only_on_guided_layers_and_restored(model):
    before = dict(model.unet.attn_processors)
    recorder = AttentionRecorder(LVD_GUIDED_LAYERS)
    guided = {f"{name}.processor" for name in LVD_GUIDED_LAYERS}
    with recording_attention(model.unet, recorder) as installed_recorder:
        assert installed_recorder is recorder
        during = model.unet.attn_processors
        for name, processor in during.items():
            if name in guided:
                assert isinstance(processor, RecordingAttnProcessor) and processor.recorder is recorder
                assert processor.layer_name == name.removesuffix(".processor")
            else:
                assert processor is before[name]   # every other layer keeps its own processor
    after = model.unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    # Restored even when the body raises.
    with pytest.raises(KeyError):
        with recording_attention(model.unet, recorder):
            raise KeyError("boom")
    after = model.unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert not recorder.enabled


@pytest.mark.parametrize("layer, message", [
    ("down_blocks.1.temp_attentions.0.transformer_blocks.0.attn2", "not a spatial cross-attention layer"),
    ("transformer_in.transformer_blocks.0.attn2", "not a spatial cross-attention layer"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1", "not a spatial cross-attention layer"),
    ("down_blocks.7.attentions.0.transformer_blocks.0.attn2", "is not an attention module of this UNet"),
    ("down_blocks.1.attentions.0", "is not an attention module of this UNet"),
])
def test_selecting_a_temporal_or_missing_layer_raises(model, layer, message):
    before = dict(model.unet.attn_processors)
    with pytest.raises(ValueError, match=message) as error:
        with recording_attention(model.unet, AttentionRecorder(LVD_GUIDED_LAYERS[:2] + (layer,))):
            pass
    assert layer in str(error.value) and LVD_GUIDED_LAYERS[0] in str(error.value)  # names the choices
    with pytest.raises(ValueError, match=message):
        check_guided_layers(model.unet, [layer])
    after = model.unet.attn_processors
    assert all(after[name] is before[name] for name in before)   # nothing was installed


def test_early_stop_gives_the_same_maps_and_skips_the_rest(model, inputs):
    latents, timestep, text = inputs
    calls = []
    hook = model.unet.up_blocks[3].register_forward_hook(lambda *args: calls.append(1))
    try:
        results = {}
        for stop in (False, True):
            recorder = AttentionRecorder(LVD_GUIDED_LAYERS, stop_when_complete=stop)
            with recording_attention(model.unet, recorder):
                results[stop] = run_recorded_forward(model.unet, recorder, latents, timestep,
                                                     encoder_hidden_states=text)
            assert not recorder.enabled
    finally:
        hook.remove()
    assert len(calls) == 1   # only the full forward reached up_blocks.3
    assert list(results[True]) == list(results[False])
    for name in LVD_GUIDED_LAYERS:
        assert torch.equal(results[True][name], results[False][name]), name


def test_stop_forward_is_raised_after_the_last_layer():
    recorder = AttentionRecorder(["a", "b"])
    recorder.start()
    recorder.record("a", torch.zeros(1, 1, 4, 3))
    with pytest.raises(StopForward):
        recorder.record("b", torch.zeros(1, 1, 4, 3))
    recorder.start()
    assert recorder.maps == {} and recorder.enabled   # every guided pass starts from an empty record


def test_token_columns_only_equal_the_full_maps_columns(model, inputs):
    latents, timestep, text = inputs
    token_indices = torch.tensor([2, 3, 7])
    full_recorder = AttentionRecorder(LVD_GUIDED_LAYERS)
    token_recorder = AttentionRecorder(LVD_GUIDED_LAYERS, token_indices=token_indices)
    with recording_attention(model.unet, full_recorder):
        full = run_recorded_forward(model.unet, full_recorder, latents, timestep, encoder_hidden_states=text)
    with recording_attention(model.unet, token_recorder):
        columns = run_recorded_forward(model.unet, token_recorder, latents, timestep, encoder_hidden_states=text)
    for name in LVD_GUIDED_LAYERS:
        assert columns[name].shape[-1] == 3
        assert torch.equal(columns[name], full[name][..., token_indices]), name


def test_recording_processor_rejects_self_attention(model, inputs):
    """Installed by hand on a self-attention layer, the recorded path refuses instead of guessing."""
    latents, timestep, text = inputs
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    recorder = AttentionRecorder([layer])
    before = dict(model.unet.attn_processors)
    installed = dict(before)
    installed[f"{layer}.processor"] = RecordingAttnProcessor(recorder, layer)
    model.unet.set_attn_processor(installed)
    try:
        with pytest.raises(ValueError, match="only plain cross-attention layers can be recorded"):
            run_recorded_forward(model.unet, recorder, latents, timestep, encoder_hidden_states=text)
    finally:
        model.unet.set_attn_processor(dict(before))
