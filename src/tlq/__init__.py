"""tlq: token-level importance-aware layer-wise post-training quantization for vision-language models."""

__version__ = "0.1.0"

from tlq.errors import TlqError  # noqa: E402
from tlq.recipe import Recipe, Scheme, parse_scheme  # noqa: E402


def quantize(*args, **kwargs):
    """See `tlq.api.quantize` (imported lazily: torch and transformers load only when needed)."""
    from tlq.api import quantize as _quantize

    return _quantize(*args, **kwargs)


__all__ = ["Recipe", "Scheme", "TlqError", "parse_scheme", "quantize", "__version__"]
