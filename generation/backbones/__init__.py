"""Backbone adapters: one per family of video models (see `generation.backbones.base.Backbone`)."""
from __future__ import annotations

from generation.backbones.base import Backbone, TextConditioning
from generation.backbones.unet3d import UNet3DBackbone
from models.video_model import VideoModel

__all__ = ["Backbone", "TextConditioning", "UNet3DBackbone", "backbone_for"]


def backbone_for(model) -> Backbone:
    """The adapter of a loaded model (a `Backbone` is returned as it is)."""
    if isinstance(model, Backbone):
        return model
    if isinstance(model, VideoModel):
        return UNet3DBackbone(model)
    raise TypeError(f"no backbone adapter for {type(model).__name__}; expected a models.video_model.VideoModel "
                    "(UNet3D family) or a Backbone")
