"""Tensor operations: kernel mean embeddings and MMD (kme.py: dispatch to Triton or torch; kme_reference.py: the
specification)."""
