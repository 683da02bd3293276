"""The layer rules of the fast path and the lookup of the rule for a layer."""

from __future__ import annotations

import keras

from clars_tf.per_example.embedding_rule import EmbeddingRule
from clars_tf.per_example.layer_rules import LayerRule
from clars_tf.per_example.linear_rules import Conv2DRule, DenseRule, DepthwiseConv2DRule
from clars_tf.per_example.normalization_rules import (
    BatchNormalizationRule,
    GroupNormalizationRule,
    LayerNormalizationRule,
)

RULES: tuple[LayerRule, ...] = (
    DenseRule(),
    Conv2DRule(),
    DepthwiseConv2DRule(),
    EmbeddingRule(),
    BatchNormalizationRule(),
    LayerNormalizationRule(),
    GroupNormalizationRule(),
)


def find_rule(layer: keras.layers.Layer) -> LayerRule | None:
    """Return the rule for `layer`, or None when only the reference path applies."""
    for rule in RULES:
        if rule.matches(layer):
            return rule
    return None
