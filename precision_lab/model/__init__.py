"""The ST-MoE encoder-decoder: config presets, pure init/apply, expert-parallel sharding, size/FLOP info."""

from precision_lab.model.config import PRESETS, ModelConfig, get_model_config
from precision_lab.model.transformer import ModelOutput, apply, init, total_loss

__all__ = ["ModelConfig", "PRESETS", "get_model_config", "ModelOutput", "init", "apply", "total_loss"]
