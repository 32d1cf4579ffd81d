"""Checkpoint conversion between Hugging Face formats (Huginn, Ouro, Llama/Qwen2) and LoopedLM.

`load_converted(dir) -> (ModelConfig, state_dict)` is what a trainer's `init.from` needs.
"""
from stars_scale.convert.api import (EXPORT_FORMATS, IMPORT_FORMATS, ImportResult, convert_from_hf,
                                     export_checkpoint, import_checkpoint)
from stars_scale.convert.checkpoint import load_converted, load_converted_run, save_converted

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "ImportResult", "convert_from_hf", "export_checkpoint",
           "import_checkpoint", "load_converted", "load_converted_run", "save_converted"]
