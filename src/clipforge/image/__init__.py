"""Image -> pixels: loading and OpenAI's preprocessing."""

from .transform import ImageLoadError, Preprocess, load_image

__all__ = ["ImageLoadError", "Preprocess", "load_image"]
