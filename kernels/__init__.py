"""Triton kernels for PerturbDiff, installed under the import name ``perturbdiff_kernels``.

(A PyPI package called ``kernels`` exists; this folder never installs under that name.)
The batched kernel-mean-embedding / MMD kernels arrive with the model-core work.
"""
