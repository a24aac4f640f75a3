"""o3lite: train o1/o3-style reasoning models in JAX."""
