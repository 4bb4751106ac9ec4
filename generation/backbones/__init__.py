"""Backbone adapters: one per family of video models (see `generation.backbones.base.Backbone`)."""
from __future__ import annotations

from generation.backbones.base import Backbone, TextConditioning
from generation.backbones.unet3d import UNet3DBackbone
from generation.backbones.wan import WanBackbone
from models.video_model import VideoModel
from models.wan import WanVideoModel

__all__ = ["Backbone", "TextConditioning", "UNet3DBackbone", "WanBackbone", "backbone_for"]


def backbone_for(model) -> Backbone:
    """The adapter of a loaded model (a `Backbone` is returned as it is)."""
    if isinstance(model, Backbone):
        return model
    if isinstance(model, VideoModel):
        return UNet3DBackbone(model)
    if isinstance(model, WanVideoModel):
        return WanBackbone(model)
    raise TypeError(f"no backbone adapter for {type(model).__name__}; expected a models.video_model.VideoModel "
                    "(UNet3D family), a models.wan.WanVideoModel (Wan 2.1) or a Backbone")
