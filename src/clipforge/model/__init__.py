"""Model: image towers (``vision``), the shared transformer, and the ``CLIP`` class."""

from .clip import CLIP

__all__ = ["CLIP"]
