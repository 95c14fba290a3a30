"""Test-wide settings: float32 matrix products at full precision on every backend.

On GPUs JAX's default float32 matmul may use TF32 (about 1e-3 relative error), which would
hide real mismatches behind loose tolerances; the references here are float32 or float64.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
