"""The configs of the attention control families (masking, modulation), apart from their torch code
(`generation.attention_control`), so that flags and configs are built without importing torch (--help, --dry-run).
"""
from __future__ import annotations

from dataclasses import dataclass

# Kinds of attention layers (generation.backbones.base re-exports them).
CROSS = "cross"        # queries: positions of one frame (UNet3D) or of the whole video (Wan); keys: text tokens
SPATIAL = "spatial"    # self-attention among the positions of one frame
TEMPORAL = "temporal"  # self-attention among the frames at one position
VIDEO = "video"        # self-attention among all positions of all (latent) frames (a DiT's 3-D attention)


@dataclass(frozen=True)
class MaskingConfig:
    """Peekaboo-style attention masking (zero extra passes). Every field changes results."""

    max_index_step: int = 10       # mask the first N denoising steps (ours: LVD's guided steps; 0: off)
    cross: bool = True             # text cross-attention: object tokens in their box, background words outside
    self_attention: bool = True    # spatial self-attention (UNet3D) / 3-D video self-attention (Wan)
    temporal: bool = True          # temporal attention per object track (UNet3D's temporal layers)
    background_tokens: bool = True  # confine the prompt's non-object words to the background

    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, on in ((CROSS, self.cross), (SPATIAL, self.self_attention),
                                           (VIDEO, self.self_attention), (TEMPORAL, self.temporal)) if on)

    def strength_at(self, kind: str, step_index: int, num_steps: int) -> float:
        return 1.0 if step_index < self.max_index_step else 0.0


@dataclass(frozen=True)
class ModulationConfig:
    """DenseDiffusion-style attention modulation: a logit bias that decays over the steps. Every field changes
    results."""

    cross_strength: float = 2.5    # s for text cross-attention, in logit units (ours; 0: off)
    self_strength: float = 0.5     # s for spatial / temporal / 3-D self-attention (ours; 0: off)
    decay_power: float = 5.0       # lambda_i = s (1 - i / N)^p (DenseDiffusion: t^5)
    max_index_step: int = 1000     # modulate only the first N steps (default: all)
    temporal: bool = True          # also UNet3D's temporal layers (with self_strength)

    def kinds(self) -> tuple[str, ...]:
        kinds = [CROSS] if self.cross_strength else []
        if self.self_strength:
            kinds += [SPATIAL, VIDEO] + ([TEMPORAL] if self.temporal else [])
        return tuple(kinds)

    def strength_at(self, kind: str, step_index: int, num_steps: int) -> float:
        if step_index >= self.max_index_step:
            return 0.0
        scale = self.cross_strength if kind == CROSS else self.self_strength
        return float(scale * (1.0 - step_index / num_steps) ** self.decay_power)
