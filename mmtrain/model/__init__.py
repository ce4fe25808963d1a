"""The fusion Transformer (a plain nn.Module) and its presets."""

from mmtrain.model.config import PRESETS, ModelConfig, preset
from mmtrain.model.fusion import FusionTransformer

__all__ = ["PRESETS", "ModelConfig", "preset", "FusionTransformer"]
