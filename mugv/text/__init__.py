"""Text conditioning: the T5 encoder wrapper (SPEC section 6). transformers is imported lazily."""

from mugv.text.t5 import T5TextEncoder
from mugv.text.tiny import make_tiny_t5

__all__ = ["T5TextEncoder", "make_tiny_t5"]
