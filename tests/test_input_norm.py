"""``input_norm``: layer norm on each gate's input projection of a recurrent layer (the RNN
recipe of issue 17, as DS2 normalised its input projections), against a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import cells


@pytest.mark.parametrize("cell", ["gru", "rnn_clipped_relu"])
def test_input_norm_normalises_each_gate_per_frame(cell):
    batch, steps, d, h = 2, 5, 3, 4
    x = jax.random.normal(jax.random.key(0), (batch, steps, d))
    lengths = jnp.array([5, 3])
    layer = cells.RecurrentLayer(cell, h, input_norm=True)
    variables = layer.init(jax.random.key(1), x, lengths)
    p = variables["params"]
    # A learned scale and shift that are not 1 and 0, per gate and unit.
    gates = cells.GATES[cell]
    norm = {"scale": 1.0 + jax.random.normal(jax.random.key(2), (len(gates), h)),
            "bias": jax.random.normal(jax.random.key(3), (len(gates), h))}
    p = {**p, "projection_norm": norm}
    out, _ = layer.apply({**variables, "params": p}, x, lengths)

    # Reference: x·W_i + b_i per gate, normalised over its H units (biased variance,
    # flax's eps 1e-6), scaled and shifted, then the plain recurrence.
    proj = []
    for g, gate in enumerate(gates):
        a = np.asarray(x) @ np.asarray(p[f"input_{gate}"]["kernel"]) + np.asarray(
            p[f"input_{gate}"]["bias"])
        a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
        proj.append(a * np.asarray(norm["scale"][g]) + np.asarray(norm["bias"][g]))
    proj = np.concatenate(proj, axis=-1)
    w_h = jnp.concatenate([p[f"recurrent_{gate}"]["kernel"] for gate in gates], axis=1)
    b_h = jnp.concatenate([p[f"recurrent_{gate}"]["bias"] for gate in gates])
    expected = np.zeros((batch, steps, h))
    for b in range(batch):
        state = jnp.zeros((1, h))
        for t in range(int(lengths[b])):
            state, _ = cells.cell_step(cell, state, jnp.asarray(proj[b : b + 1, t]), w_h, b_h)
            expected[b, t] = np.asarray(state[0])
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    # Without the option the layer has no norm parameters (the default path is unchanged).
    plain = cells.RecurrentLayer(cell, h).init(jax.random.key(1), x, lengths)["params"]
    assert set(plain) == set(p) - {"projection_norm"}
