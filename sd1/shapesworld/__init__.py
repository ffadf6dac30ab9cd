"""The shapes world: a procedural text-to-image world with an exact judge, and the small model trained on it.

`world` draws scenes, images and captions; `judge` says what an image shows; `train` trains the demo model.
"""
