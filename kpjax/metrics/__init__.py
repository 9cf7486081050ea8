"""Scores of keypoint predictions, each in one function shared by training, `kpjax.evaluate` and the tests:
FashionAI's normalised error and PCK (`normalized_error`). numpy only."""
