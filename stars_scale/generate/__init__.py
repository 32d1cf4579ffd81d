"""Generation from looped LMs: KV cache across loops, per-token exit rules, batched API."""
from stars_scale.generate.exit_rules import RULES, make_rule
from stars_scale.generate.generator import GenerateOptions, GenerationResult, generate, generate_many

__all__ = ["RULES", "GenerateOptions", "GenerationResult", "generate", "generate_many", "make_rule"]
