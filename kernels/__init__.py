"""Triton kernels for PerturbDiff, installed under the import name ``perturbdiff_kernels``.

(A PyPI package called ``kernels`` exists; this folder never installs under that name.)
kme.py: batched kernel mean embeddings and MMD, forward and backward, for perturbdiff.ops.kme.
"""
