"""A stack of unidirectional layers as one wavefront-ordered recurrence (`sparse_stack`,
`bsrnn.inference.Wavefront`) against the layers run one after the other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import kernels
from tests.test_recurrence import SEQUENCE, _carry0, _fake_timer, _layer_case

STEPS, BATCH = 9, 3
LENGTHS = jnp.asarray([STEPS, 0, 4], jnp.int32)  # full, empty, partial


def _stack_case(cell, hiddens, seed=40, block_shape=(4, 4)):
    """Random layers of widths ``hiddens`` (each reading the one below), inputs (B, T, 5)
    and random initial carries."""
    build, _ = SEQUENCE[cell]
    layers, carries, x = [], [], None
    width = 5
    for i, hidden in enumerate(hiddens):
        params, masks, xi, h0 = _layer_case(seed + i, hidden, block_shape, batch=BATCH,
                                            steps=STEPS, in_features=width, cell=cell)
        x = xi if x is None else x
        layers.append(build(params, masks, block_shape))
        carries.append(_carry0(cell, h0, seed + i))
        width = hidden
    return tuple(layers), tuple(carries), jnp.asarray(x)


@pytest.mark.parametrize("cell, hiddens", [
    ("gru", (8, 8, 8)), ("lstm", (8, 8)), ("rnn", (12,)),
    ("gru", (8, 12)),  # unequal H: the per-layer form of the step
])
def test_wavefront_equals_the_layers_one_after_the_other(cell, hiddens):
    layers, carries, x = _stack_case(cell, hiddens)
    _, run = SEQUENCE[cell]

    @jax.jit  # one program: fewer compiles
    def both(x, carries, lengths):
        with jax.default_matmul_precision("highest"):
            y, finals = x, []
            for w, c in zip(layers, carries, strict=True):
                y, c = run(y, w, c, lengths=lengths, impl="xla", unroll=2)
                finals.append(c)
            got = kernels.sparse_stack(x, layers, carries, lengths=lengths, impl="wavefront",
                                       unroll=2)
            # no lengths: every row runs all T steps (the drain steps must not move states)
            full = kernels.sparse_stack(x, layers, carries, impl="wavefront", unroll=2)
            return (y, tuple(finals)), got, full

    (want, want_finals), (out, finals), full = both(x, carries, LENGTHS)
    assert out.shape == (BATCH, STEPS, hiddens[-1])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert len(finals) == len(hiddens)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), finals,
        want_finals)
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)  # length 0: no output ...
    jax.tree_util.tree_map(lambda f, c: np.testing.assert_array_equal(f[1], c[1]), finals,
                           carries)  # ... and every layer keeps its initial carry
    np.testing.assert_array_equal(np.asarray(out)[2, 4:], 0.0)
    assert np.abs(np.asarray(out)[0]).min() > 0 or cell == "rnn_clipped_relu"
    np.testing.assert_allclose(full[0][0], want[0], rtol=1e-5, atol=1e-6)  # row 0: T steps
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[0], b[0], rtol=1e-5,
                                                                   atol=1e-6), full[1],
                           want_finals)

def test_stack_checks_its_layers():
    layers, _, x = _stack_case("gru", (8, 12))
    with pytest.raises(ValueError, match="width"):
        kernels.sparse_stack(x, layers[::-1], impl="wavefront")
    with pytest.raises(ValueError, match="one initial carry per layer"):
        kernels.sparse_stack(x, layers, (None,), impl="wavefront")
    with pytest.raises(ValueError, match="impl"):
        kernels.sparse_stack(x, layers, impl="pallas")


@pytest.mark.parametrize("winner", ["wavefront", "separate"])
def test_auto_times_the_wavefront_against_the_separate_layers(winner):
    layers, _, _ = _stack_case("gru", (8, 8))
    seconds = dict(dense=2.0, xla=9.0, pallas=9.0, persistent=9.0, mosaic=9.0,
                   wavefront=3.0, separate=3.0)
    seconds.update({winner: 1.0})
    with kernels.autotune.using_timer(_fake_timer(seconds)):  # 2 steps: fast compiles
        assert kernels.resolve_stack_impl(layers, 1, 2) == winner
        decisions = kernels.autotune.decisions()
    (stack,) = [d for k, d in decisions.items() if k.startswith("sparse_stack")]
    assert set(stack["times_s"]) == {"wavefront", "separate"}
    assert len(decisions) == 3  # "separate" measured each layer's own choice first
    assert kernels.resolve_stack_impl(layers, 1, 2, impl="separate") == "separate"
