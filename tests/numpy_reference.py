"""A NumPy implementation of the CLARS/LARS update rule, written from the formulas.

Tests compare the TensorFlow optimizers against this code, so it shares
nothing with `clars_tf`: every step is spelled out in float64.
"""

import numpy as np


def reference_trust_ratio(weight_norm, denominator, trust_coefficient, epsilon, max_trust_ratio):
    """Trust ratio with the zero-norm guard: 1 where either norm is zero."""
    if weight_norm > 0 and denominator > 0:
        ratio = trust_coefficient * weight_norm / (denominator + epsilon)
        if max_trust_ratio is not None:
            ratio = min(ratio, max_trust_ratio)
        return ratio
    return 1.0


class ReferenceOptimizer:
    """Momentum SGD with layer-wise trust ratios, one update per `update` call.

    `store` rounds weights and velocities to their storage dtype after each
    update, as a float16 or bfloat16 variable does.
    """

    def __init__(
        self,
        weights,
        *,
        momentum,
        nesterov,
        classic_momentum,
        weight_decay,
        trust_coefficient,
        max_trust_ratio,
        epsilon,
        decay_mask,
        adaptation_mask,
        store=None,
    ):
        self.store = store or (lambda array: array)
        self.weights = [self.store(np.asarray(w, np.float64)) for w in weights]
        self.velocities = [np.zeros_like(w) for w in self.weights]
        self.momentum = momentum
        self.nesterov = nesterov
        self.classic_momentum = classic_momentum
        self.weight_decay = weight_decay
        self.trust_coefficient = trust_coefficient
        self.max_trust_ratio = max_trust_ratio
        self.epsilon = epsilon
        self.decay_mask = decay_mask
        self.adaptation_mask = adaptation_mask
        self.ratios = []

    def update(self, gradients, learning_rate, complete_norms=None):
        """Apply one update from mean gradients.

        `complete_norms[i]` is the complete norm of variable i, or None to
        divide by the norm of its update direction (LARS, or CLARS without
        gradient samples).
        """
        ratios = []
        for i, gradient in enumerate(gradients):
            weight = self.weights[i]
            gradient = np.asarray(gradient, np.float64)
            direction = gradient + self.weight_decay * weight if self.decay_mask[i] else gradient

            if complete_norms is None or complete_norms[i] is None:
                denominator = np.linalg.norm(direction)
            else:
                denominator = complete_norms[i]
            ratio = reference_trust_ratio(
                np.linalg.norm(weight),
                denominator,
                self.trust_coefficient,
                self.epsilon,
                self.max_trust_ratio,
            )
            if not self.adaptation_mask[i]:
                ratio = 1.0
            ratios.append(ratio)

            velocity = self.velocities[i]
            if self.classic_momentum:
                velocity = self.momentum * velocity + learning_rate * ratio * direction
                step = velocity
                if self.nesterov:
                    step = self.momentum * velocity + learning_rate * ratio * direction
            else:
                velocity = self.momentum * velocity + direction
                step = learning_rate * ratio * velocity
                if self.nesterov:
                    step = learning_rate * ratio * (direction + self.momentum * velocity)
            self.velocities[i] = self.store(velocity)
            self.weights[i] = self.store(weight - step)
        self.ratios.append(ratios)
        return ratios
