"""clipforge: CLIP models, exact to the reference implementations, in one small package.

The pipeline, in reading order: ``text`` (tokenizer) -> ``image`` (transform) -> ``model``
(vision, text, CLIP) -> ``weights`` (formats in and out) -> command line (``cli``).
"""

from .configs import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .factory import available_models, create_model, load
from .image import ImageLoadError, Preprocess, load_image
from .model import CLIP
from .text import ContextLengthError, Tokenizer, get_tokenizer, tokenize
from .weights import save_model

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CLIPConfig", "ContextLengthError", "ImageLoadError", "Preprocess",
    "PreprocessConfig", "TextConfig", "Tokenizer", "VisionConfig", "available_models",
    "create_model", "get_tokenizer", "load", "load_image", "save_model", "tokenize",
]
