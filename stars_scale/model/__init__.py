"""Looped (recurrent-depth) language models: plain single-device modules."""
from stars_scale.model.attention import attend, flash_available, math_attention
from stars_scale.model.looped import LoopedLM, LoopOutput

__all__ = ["LoopedLM", "LoopOutput", "attend", "flash_available", "math_attention"]
