"""Separation: the rank policy, the SVD, the per-layer rewrites registered by Keras class, the generic
model walk and its per-layer report."""
