"""Synthetic data with exact keypoint labels: garments in the FashionAI release's layout
(kpjax.data.synthetic.garments), and stick figures and arrows in COCO keypoint files (kpjax.data.synthetic.shapes)."""

from kpjax.data.synthetic.garments import (Example, Garment, MAX_SIDE, MIN_SIDE, garment_shape, generate,  # noqa: F401
                                           render)
from kpjax.data.synthetic.shapes import generate_coco  # noqa: F401

__all__ = ['Example', 'Garment', 'MAX_SIDE', 'MIN_SIDE', 'garment_shape', 'generate', 'generate_coco', 'render']
