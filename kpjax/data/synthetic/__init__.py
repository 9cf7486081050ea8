"""Synthetic garments with exact keypoint labels, in the FashionAI release's layout (kpjax.data.synthetic.garments)."""

from kpjax.data.synthetic.garments import (Example, Garment, MAX_SIDE, MIN_SIDE, garment_shape, generate,  # noqa: F401
                                           render)

__all__ = ['Example', 'Garment', 'MAX_SIDE', 'MIN_SIDE', 'garment_shape', 'generate', 'render']
