"""Pallas kernels for jsoftmax, installed as ``jsoftmax.kernels``.

(Being built: tiled softmax / log-softmax, cross-entropy and linear cross-entropy.)
"""
