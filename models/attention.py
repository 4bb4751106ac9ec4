"""Cross-attention recording on the stock diffusers UNet, through attention processors.

Guided layers are addressed by module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``,
reference spec 4.1). Only those layers get :class:`RecordingAttnProcessor`; every other layer keeps
its fast default. While its recorder is off, the recording processor computes exactly what the
default SDPA processor computes, so the main (CFG) pass is unchanged; while it is on (the guided
passes), it takes the reference's explicit path (scores and softmax in the model dtype, spec 4.2),
hands the probabilities of the requested token columns to the recorder, and can stop the forward
pass once the last guided layer has been recorded, since nothing after it feeds the energy.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

_TEMPORAL_MARKERS = ("temp_attentions", "transformer_in")


class StopForward(Exception):
    """Raised inside the UNet once every guided layer is recorded; caught by :func:`run_recorded_forward`."""


class AttentionRecorder:
    """Holds the attention probabilities of one guided forward pass, keyed by layer path.

    ``token_indices`` selects the token columns kept (None keeps all 77). With ``stop_when_complete``
    the forward pass is aborted right after the last expected layer is recorded.
    """

    def __init__(self, layer_names: Sequence[str], token_indices: torch.Tensor | None = None,
                 stop_when_complete: bool = True):
        self.layer_names = tuple(layer_names)
        self.token_indices = token_indices
        self.stop_when_complete = stop_when_complete
        self.enabled = False
        self.maps: dict[str, torch.Tensor] = {}

    def start(self) -> None:
        self.maps = {}
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    def record(self, layer_name: str, probs: torch.Tensor, *, columns_selected: bool = False) -> None:
        """``probs``: (batch*frames, heads, h*w, tokens). Kept with their graph (not detached).

        ``columns_selected``: the processor already kept only ``token_indices`` (in that order), e.g. to avoid
        holding all text columns for the backward pass (models/wan_attention.py).
        """
        if self.token_indices is not None and not columns_selected:
            probs = probs.index_select(-1, self.token_indices.to(probs.device))
        self.maps[layer_name] = probs
        if self.stop_when_complete and len(self.maps) == len(self.layer_names):
            raise StopForward


class RecordingAttnProcessor:
    """The replaced processor when its recorder is off; the explicit, recorded path of spec 4.2 when on."""

    def __init__(self, recorder: AttentionRecorder, layer_name: str, fallback=None):
        self.recorder = recorder
        self.layer_name = layer_name
        # The processor it replaces runs while the recorder is off, so unguided passes are unchanged.
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if not self.recorder.enabled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       *args, **kwargs)
        if encoder_hidden_states is None or attn.spatial_norm is not None or attn.group_norm is not None \
                or hidden_states.ndim != 3 or attention_mask is not None:
            raise ValueError(f"{self.layer_name}: only plain cross-attention layers can be recorded "
                             "(3-D hidden states, encoder states, no mask or norms)")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))          # (B*heads, h*w, d)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))    # (B*heads, 77, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)               # (B*heads, h*w, 77)
        self.recorder.record(self.layer_name, probs.unflatten(0, (batch_size, attn.heads)))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def check_guided_layers(unet: torch.nn.Module, layer_names: Sequence[str]) -> None:
    """Raise ValueError unless every name is a spatial cross-attention module path of ``unet``."""
    available = {name.removesuffix(".processor") for name in unet.attn_processors}
    spatial_cross = sorted(name for name in available if name.endswith("attn2")
                           and not any(marker in name for marker in _TEMPORAL_MARKERS))
    for name in layer_names:
        if name not in available:
            raise ValueError(f"guided layer {name!r} is not an attention module of this UNet; spatial "
                             f"cross-attention layers are: {spatial_cross}")
        if name not in spatial_cross:
            raise ValueError(f"guided layer {name!r} is not a spatial cross-attention layer (temporal or "
                             f"self-attention layers are never guided); choose from {spatial_cross}")


@contextlib.contextmanager
def processors_replaced(model: torch.nn.Module, layer_names: Sequence[str],
                        build: Callable[[str, Any], Any]) -> Iterator[None]:
    """Give each named attention module the processor ``build(name, the processor it replaces)``; restore
    every previous processor on exit (whatever happened inside). One mechanism for every backbone."""
    previous = dict(model.attn_processors)
    installed = dict(previous)
    for name in layer_names:
        key = f"{name}.processor"
        installed[key] = build(name, previous[key])
    model.set_attn_processor(installed)
    try:
        yield
    finally:
        model.set_attn_processor(dict(previous))


@contextlib.contextmanager
def recording_attention(unet: torch.nn.Module, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Install recording processors on the recorder's layers; restore the previous processors on exit."""
    check_guided_layers(unet, recorder.layer_names)
    build = lambda name, replaced: RecordingAttnProcessor(recorder, name, fallback=replaced)  # noqa: E731
    with processors_replaced(unet, recorder.layer_names, build):
        try:
            yield recorder
        finally:
            recorder.stop()


def run_recorded_forward(unet: torch.nn.Module, recorder: AttentionRecorder, *args, **kwargs) -> dict[str, torch.Tensor]:
    """One forward pass with the recorder on; returns the recorded maps (the UNet output is unused)."""
    recorder.start()
    try:
        unet(*args, **kwargs)
    except StopForward:
        pass
    finally:
        recorder.stop()
    missing = [name for name in recorder.layer_names if name not in recorder.maps]
    if missing:
        raise RuntimeError(f"the forward pass did not reach the guided layers {missing}")
    return recorder.maps


class BiasedAttnProcessor:
    """Adds a logit bias to an attention module and otherwise runs the processor it replaced.

    ``bias_fn(hidden_states, keys_length)`` returns a ``(rows, 1, queries, keys)`` additive bias (``-inf``
    masks a pair), broadcast over heads, or None to leave the call untouched (the replaced processor then sees
    exactly its usual arguments, so an inactive bias changes nothing, bit for bit). A bias handed in by an
    outer processor is added to, so several installations compose. The replaced processor applies it as
    its ``attention_mask`` (diffusers' ``AttnProcessor2_0`` and ``WanAttnProcessor`` both add a float mask to
    the scaled scores inside SDPA), so no attention math is duplicated here.
    """

    def __init__(self, layer_name: str, fallback, bias_fn: Callable[[torch.Tensor, int], torch.Tensor | None]):
        self.layer_name = layer_name
        self.fallback = fallback
        self.bias_fn = bias_fn

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        keys = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bias = self.bias_fn(hidden_states, keys.shape[1])
        if bias is not None:
            bias = bias.to(hidden_states.dtype)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
