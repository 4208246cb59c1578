"""The toy world's closed vocabulary.

Prompts use only these words, so a word-level tokenizer (one token per word) can be
built from this list and a tiny text encoder can learn every word from a few thousand
captions.
"""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, np.ndarray] = {
    "red": np.array([0.85, 0.12, 0.10]),
    "green": np.array([0.15, 0.70, 0.20]),
    "blue": np.array([0.12, 0.25, 0.90]),
    "yellow": np.array([0.95, 0.85, 0.10]),
    "purple": np.array([0.60, 0.20, 0.75]),
}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder")
LIGHTS: tuple[str, ...] = ("left", "right", "above")
GLUE: tuple[str, ...] = ("a", "in", "front", "of", "to", "the", "and", ",", "light", "from")

WORDS: tuple[str, ...] = tuple(dict.fromkeys([*COLOURS, *SHAPES, *LIGHTS, *GLUE]))
