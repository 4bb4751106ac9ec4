"""Cross-attention recording on the stock diffusers `WanTransformer3DModel`, through attention processors.

Guided modules are addressed by module path, ``blocks.<i>.attn2`` (the text cross-attention of block i; every
``attn1`` is video self-attention and is never guided). Only those modules get :class:`WanRecordingAttnProcessor`,
installed by :func:`recording_wan_attention` (a context manager that restores the previous processors); every
other module keeps its own. While the recorder is off the recording processor is the processor it replaced, so
the classifier-free-guidance passes are untouched. While it is on (a guided pass) it computes what
`WanAttnProcessor` computes for text-to-video (q from the video tokens, k / v from the 512 text tokens, the qk
RMS-norm across heads, SDPA, the output projection), with the same kernels, so its output is the stock output;
besides, it hands the recorder

    softmax(q k^T / sqrt(head_dim)) over all 512 text keys, in float32, object-token columns only,

laid out ``(videos * latent frames, heads, h * w, tokens)`` with ``h, w = H / 16, W / 16`` (the transformer
flattens its patch grid as frame, row, column).

Memory and time, for the guided passes:
- the probabilities are computed under activation checkpointing (only q and k are kept for the backward pass;
  the ``(heads, N, 512)`` scores are rebuilt there), so recording costs no ``N x 512`` tensor per layer;
- the text keys and values of the guided modules depend on the prompt only: :class:`WanRecordingState` computes
  them once per prompt and reuses them in every guided pass;
- :func:`checkpointed_transformer_blocks` turns on diffusers' gradient checkpointing of the transformer blocks
  for one guided pass (``--low-memory``): a block keeps only its input, and is recomputed in the backward pass
  with the recorder in replay mode (the same operations, nothing recorded), so energy and gradient are unchanged;
  the pass then stops before the block after the last guided one (a check in the checkpoint call, outside it).

Not supported (a clear error): image-conditioned Wan (I2V: ``add_k_proj``), attention masks and rotary
embeddings on the cross-attention. Fused projections (``fuse_qkv_projections``) are handled.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch.utils.checkpoint import checkpoint

from models.attention import AttentionRecorder, StopForward, processors_replaced

_BLOCK_CROSS_ATTENTION = re.compile(r"^blocks\.(\d+)\.attn2$")


def compute_text_attention_columns(query: torch.Tensor, key: torch.Tensor,
                                   columns: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over every key, in float32, keeping ``columns`` (None: all).

    ``query``: (B, N, heads, d) video tokens; ``key``: (B, T, heads, d) text tokens -> (B, heads, N, J).
    """
    scale = query.shape[-1] ** -0.5
    scores = torch.einsum("bnhd,bthd->bhnt", query.float(), key.float()) * scale
    probs = scores.softmax(dim=-1)
    return probs if columns is None else probs.index_select(-1, columns)


class WanRecordingState:
    """What the recording processors of one recording context share: the latent token grid of the current pass,
    the text keys / values per guided module (cached per prompt), and the replay switch of the checkpointed
    backward pass."""

    def __init__(self):
        self.grid: tuple[int, int, int] | None = None   # (latent frames, h, w) of the transformer's tokens
        self.replaying = False
        # Entered around every checkpoint recomputation besides the replay (torch function / dispatch modes are
        # not active in the backward pass; tools such as scripts/count_wan_cost.py set theirs here).
        self.recompute_context: Callable[[], contextlib.AbstractContextManager] | None = None
        self._text: torch.Tensor | None = None          # the text embeddings the cached keys / values belong to
        self._text_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Training (shapes/training.py): keys / values are computed in every pass, with their graph, not cached.
        self.trainable_text = False

    def use_text(self, text: torch.Tensor) -> None:
        """Drop the cached keys / values unless they were computed for ``text`` (B, 512, D)."""
        if self._text is not None and (text is self._text or (
                text.device.type != "meta" and self._text.shape == text.shape and torch.equal(self._text, text))):
            return
        self._text = text  # (meta tensors cannot be compared: only the same tensor counts as the same text)
        self._text_kv = {}

    def text_kv(self, layer_name: str, attn, encoder_hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, heads, d) normalised keys and values of ``attn`` for the current text, computed once."""
        cached = None if self.trainable_text else self._text_kv.get(layer_name)
        if cached is None:
            with contextlib.nullcontext() if self.trainable_text else torch.no_grad():  # constants of a guided pass
                if getattr(attn, "fused_projections", False):
                    key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
                else:
                    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
                key = attn.norm_k(key)
                cached = (key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)))
            if not self.trainable_text:
                self._text_kv[layer_name] = cached
        return cached

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Recording processors compute their recorded path without recording (checkpoint recomputation)."""
        previous, self.replaying = self.replaying, True
        try:
            yield
        finally:
            self.replaying = previous

    def checkpoint_contexts(self):
        """``context_fn`` of `torch.utils.checkpoint.checkpoint`: nothing in the forward, replay in the recompute."""
        return contextlib.nullcontext(), self._recomputing()

    @contextlib.contextmanager
    def _recomputing(self) -> Iterator[None]:
        with self.replay(), (self.recompute_context() if self.recompute_context else contextlib.nullcontext()):
            yield


class WanRecordingAttnProcessor:
    """The replaced processor while the recorder is off; the recorded text-to-video path while it is on."""

    def __init__(self, recorder: AttentionRecorder, layer_name: str, state: WanRecordingState, fallback):
        self.recorder = recorder
        self.layer_name = layer_name
        self.state = state
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if not (self.recorder.enabled or self.state.replaying):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None:
            raise ValueError(f"{self.layer_name}: only the text cross-attention of a Wan block can be recorded "
                             "(encoder states given, no attention mask, no rotary embedding)")
        if attn.add_k_proj is not None:
            raise ValueError(f"{self.layer_name}: image-conditioned Wan (I2V, added image keys) is not supported")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))   # (B, N, heads, d)
        key, value = self.state.text_kv(self.layer_name, attn, encoder_hidden_states)  # (B, 512, heads, d)
        columns = self.recorder.token_indices
        columns = None if columns is None else columns.to(query.device)
        if query.requires_grad:  # keep q and k, not the (heads, N, 512) scores, for the backward pass
            probs = checkpoint(compute_text_attention_columns, query, key, columns, use_reentrant=False)
        else:
            probs = compute_text_attention_columns(query, key, columns)
        if self.recorder.enabled:  # not while replaying; may end the forward pass (StopForward)
            self.recorder.record(self.layer_name, self._frames_first(probs), columns_selected=columns is not None)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                              backend=getattr(self.fallback, "_attention_backend", None),
                                              parallel_config=None)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))

    def _frames_first(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, heads, F*h*w, J) -> (B*F, heads, h*w, J), batch-major (the energy's layout)."""
        if self.state.grid is None:
            raise RuntimeError("the latent grid of the guided pass is not set (WanRecordingState.grid)")
        frames, height, width = self.state.grid
        batch, heads, positions, tokens = probs.shape
        if positions != frames * height * width:
            raise RuntimeError(f"{self.layer_name}: {positions} video tokens, expected {frames}x{height}x{width}")
        return (probs.reshape(batch, heads, frames, height * width, tokens).transpose(1, 2)
                .reshape(batch * frames, heads, height * width, tokens))


def guided_module_choices(transformer: torch.nn.Module) -> list[str]:
    """The recordable modules of ``transformer``: ``blocks.<i>.attn2``, in block order."""
    names = [name.removesuffix(".processor") for name in transformer.attn_processors]
    return sorted((name for name in names if _BLOCK_CROSS_ATTENTION.match(name)),
                  key=lambda name: int(_BLOCK_CROSS_ATTENTION.match(name).group(1)))


def check_wan_guided_layers(transformer: torch.nn.Module, layer_names: Sequence[str]) -> None:
    """Raise ValueError unless every name is the text cross-attention of a block of ``transformer``."""
    choices = guided_module_choices(transformer)
    if not layer_names:
        raise ValueError(f"no guided layers given; choose from {choices[0]} .. {choices[-1]}")
    for name in layer_names:
        if name in choices:
            continue
        if re.match(r"^blocks\.\d+\.attn1$", str(name)):
            raise ValueError(f"guided layer {name!r} is a video self-attention; only the text cross-attention "
                             f"blocks.<i>.attn2 can be guided ({len(choices)} blocks: {choices[0]} .. {choices[-1]})")
        raise ValueError(f"guided layer {name!r} is not a cross-attention module of this transformer "
                         f"({len(choices)} blocks: {choices[0]} .. {choices[-1]})")
    for name in layer_names:
        if transformer.get_submodule(name).add_k_proj is not None:
            raise ValueError(f"guided layer {name!r} takes image keys (Wan I2V): only text-to-video Wan is supported")


@contextlib.contextmanager
def recording_wan_attention(transformer: torch.nn.Module, recorder: AttentionRecorder
                            ) -> Iterator[WanRecordingState]:
    """Install recording processors on the recorder's modules; restore the previous processors on exit."""
    check_wan_guided_layers(transformer, recorder.layer_names)
    state = WanRecordingState()
    build = lambda name, replaced: WanRecordingAttnProcessor(recorder, name, state, fallback=replaced)  # noqa: E731
    with processors_replaced(transformer, recorder.layer_names, build):
        try:
            yield state
        finally:
            recorder.stop()


@contextlib.contextmanager
def checkpointed_transformer_blocks(transformer: torch.nn.Module, state: WanRecordingState,
                                    recorder: AttentionRecorder) -> Iterator[None]:
    """Gradient checkpointing of the transformer blocks while a guided pass runs (diffusers' own switch, with
    non-reentrant `torch.utils.checkpoint` and the recorder in replay mode during recomputation); the previous
    setting is restored on exit.

    The early stop moves to the block boundary: no `StopForward` is raised inside a checkpointed block (older
    torch releases do not unwind a checkpoint's forward on an exception); the pass ends before the block after the
    last guided one instead, so only the guided prefix runs and is recomputed.
    """
    modules = [module for module in transformer.modules() if hasattr(module, "gradient_checkpointing")]
    previous = [(module, module.gradient_checkpointing, getattr(module, "_gradient_checkpointing_func", None))
                for module in modules]
    stop_when_complete, recorder.stop_when_complete = recorder.stop_when_complete, False

    def checkpoint_block(block, *args):
        if stop_when_complete and recorder.enabled and len(recorder.maps) == len(recorder.layer_names):
            raise StopForward  # outside the checkpoint: every guided layer is recorded
        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=state.checkpoint_contexts)

    transformer.enable_gradient_checkpointing(checkpoint_block)
    try:
        yield
    finally:
        recorder.stop_when_complete = stop_when_complete
        for module, enabled, function in previous:
            module.gradient_checkpointing = enabled
            if function is not None:
                module._gradient_checkpointing_func = function
