"""Drafters: DSpark (parallel backbone + Markov/RNN/no sequential head + confidence head), Medusa and EAGLE-3."""
from transformers import AutoConfig, AutoModel

from .config import DrafterConfig
from .model import DraftBlock, Drafter, DrafterOutput, DraftState, build_drafter, count_parameters

AutoConfig.register(DrafterConfig.model_type, DrafterConfig, exist_ok=True)
AutoModel.register(DrafterConfig, Drafter, exist_ok=True)

__all__ = ["DrafterConfig", "Drafter", "DrafterOutput", "DraftState", "DraftBlock", "build_drafter",
           "count_parameters"]
