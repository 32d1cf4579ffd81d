"""stars_scale: distributed pretraining of looped language models with STARS."""
__version__ = "0.1.0"
