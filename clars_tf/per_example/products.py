"""Squared norms of per-example sums of outer products, `g_i = sum_p a_ip (x) b_ip`.

The weight gradient of a linear map applied at P positions (the time steps of a
sequence, the pixels of a convolution output) is such a sum, where `a` contains
the layer inputs at each position and `b` the gradients of its outputs. There
are two ways to get `||g_i||^2` per example:

- materialize `g_i = a_i^T b_i` (a K x N matrix), which costs P * K * N
  multiply-adds per example,
- the ghost norm `||g_i||^2 = <a_i a_i^T, b_i b_i^T>` (two P x P Gram
  matrices), which costs P^2 * (K + N) and never forms `g_i`.

`prefer_ghost_norm` picks the cheaper one from the static sizes.
"""

from __future__ import annotations

import tensorflow as tf


def prefer_ghost_norm(positions: int | None, in_size: int, out_size: int) -> bool:
    """Return whether the ghost norm costs fewer multiply-adds than materializing.

    Unknown `positions` (a dynamic shape) chooses materializing, whose memory
    does not grow with the square of the number of positions.
    """
    if positions is None:
        return False
    ghost_cost = positions * positions * (in_size + out_size)
    materialize_cost = positions * in_size * out_size
    return ghost_cost < materialize_cost


def squared_norms_of_products(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Return `||a_i^T b_i||^2` per example for `a` (B, P, K) and `b` (B, P, N)."""
    products = tf.linalg.matmul(a, b, transpose_a=True)
    return tf.reduce_sum(tf.square(products), axis=[1, 2])


def gram(a: tf.Tensor) -> tf.Tensor:
    """Return `a_i a_i^T` per example for `a` (B, P, K), shape (B, P, P)."""
    return tf.linalg.matmul(a, a, transpose_b=True)


def ghost_squared_norms(gram_a: tf.Tensor, gram_b: tf.Tensor) -> tf.Tensor:
    """Return `<gram_a_i, gram_b_i>` per example, the squared norm of `a_i^T b_i`."""
    return tf.reduce_sum(gram_a * gram_b, axis=[1, 2])


def flatten_positions(tensor: tf.Tensor) -> tf.Tensor:
    """Reshape (B, d1, ..., dk, C) to (B, d1 * ... * dk, C), and rank 2 to (B, 1, C)."""
    shape = tf.shape(tensor)
    return tf.reshape(tensor, [shape[0], -1, shape[-1]])


def static_positions(tensor: tf.Tensor) -> int | None:
    """Return the static product of the axes between batch and channels, or None."""
    dims = tensor.shape[1:-1]
    if any(d is None for d in dims):
        return None
    count = 1
    for d in dims:
        count *= d
    return count
