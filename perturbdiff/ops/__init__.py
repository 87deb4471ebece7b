"""Tensor operations: kernel mean embeddings and MMD (torch reference; Triton dispatch arrives with issue 3)."""
