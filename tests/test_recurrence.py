"""Sparse GRU sequence kernels (XLA path, Pallas kernels in interpret mode, GPU kernels where
a GPU is present) against `bsrnn.cells.RecurrentLayer` with the same params and masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import blocks, kernels
from bsrnn.cells import GATES, RecurrentLayer
from bsrnn.kernels import recurrence_pallas

ON_GPU = jax.default_backend() == "gpu"


def _layer_case(seed, hidden, block_shape, batch=3, steps=5, in_features=7, density=0.4,
                cell="gru"):
    """A RecurrentLayer's variables with random params, random biases, block-structured
    recurrent masks (partial edge blocks when sides don't divide) and random input masks,
    plus random inputs and a random h0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, steps, in_features)).astype(np.float32)
    variables = RecurrentLayer(cell, hidden).init(jax.random.key(seed), jnp.asarray(x))
    params = jax.tree_util.tree_map(
        lambda a: (rng.standard_normal(a.shape) * (0.5 if a.ndim == 1 else a.shape[0] ** -0.5))
        .astype(np.float32),
        variables["params"],
    )
    bh, bw = block_shape
    grid = (-(-hidden // bh), -(-hidden // bw))
    masks = {}
    for gate in GATES[cell]:
        keep = rng.random(grid) < density
        keep[0, -1] = keep[-1, 0] = True  # both partial edges carry a stored block
        masks[f"recurrent_{gate}"] = {
            "kernel": np.kron(keep, np.ones(block_shape, bool))[:hidden, :hidden]}
        masks[f"input_{gate}"] = {"kernel": rng.random((in_features, hidden)) < 0.7}
    h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
    return params, masks, x, h0


def _reference(params, masks, x, h0, dtype=None):
    layer = RecurrentLayer("gru", h0.shape[1], dtype=dtype)
    with jax.default_matmul_precision("highest"):
        return layer.apply({"params": params, "masks": masks}, jnp.asarray(x),
                           initial_carry=jnp.asarray(h0, dtype or jnp.float32))


def _rel_err(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(y).all()
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _run(params, masks, x, h0, block_shape, impl, dtype=None, unroll=2, **options):
    weights = kernels.sparse_gru_weights(params, masks, block_shape, dtype=dtype)

    @jax.jit
    def run(x, h0):
        with jax.default_matmul_precision("highest"):
            return kernels.sparse_gru(x, weights, h0, impl=impl, unroll=unroll, **options)

    return run(jnp.asarray(x), jnp.asarray(h0))


BLOCK_CASES = [  # hidden, block shape
    (24, (4, 4)),  # blocks tile H exactly
    (20, (8, 8)),  # partial edge blocks on both sides of every gate
    (26, (12, 2)),  # P1's non-square block, partial rows
    (23, (3, 5)),  # odd sides, partial both ways
    (40, (32, 32)),
    (9, (1, 1)),
]


@pytest.mark.parametrize("hidden, block_shape", BLOCK_CASES)
def test_xla_matches_recurrent_layer_float32(hidden, block_shape):
    params, masks, x, h0 = _layer_case(0, hidden, block_shape)
    out, last = _run(params, masks, x, h0, block_shape, "xla")
    ref, ref_last = _reference(params, masks, x, h0)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5 and _rel_err(last, ref_last) < 1e-5


@pytest.mark.parametrize("hidden, block_shape", BLOCK_CASES[1:5])  # the partial-edge ones
def test_pallas_interpret_matches_recurrent_layer_float32(hidden, block_shape):
    params, masks, x, h0 = _layer_case(1, hidden, block_shape)
    out, last = _run(params, masks, x, h0, block_shape, "pallas_interpret")
    ref, ref_last = _reference(params, masks, x, h0)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5 and _rel_err(last, ref_last) < 1e-5


@pytest.mark.parametrize(
    "options, batch",
    [
        (dict(layout="ell"), 3),  # fixed-width panels, fma
        (dict(layout="ell", hold=True), 5),  # panels loaded up front, dot (B > 4)
        (dict(compute="dot", max_tm=16), 20),  # two batch tiles, the second partial
        (dict(compute="fma", rows_per_step=4), 3),  # blocks straddle loop steps
        (dict(compute="dot", layout="ell", rows_per_step=16), 9),
    ],
)
def test_pallas_interpret_launch_variants(options, batch):
    hidden, block_shape = 26, (12, 2)
    params, masks, x, h0 = _layer_case(2, hidden, block_shape, batch=batch)
    out, _ = _run(params, masks, x, h0, block_shape, "pallas_interpret", unroll=3, **options)
    ref, _ = _reference(params, masks, x, h0)
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "dtype, tol, impl",
    [
        (jnp.float16, 5e-3, "xla"),
        (jnp.float16, 5e-3, "pallas_interpret"),
        (jnp.bfloat16, 3e-2, "xla"),
        (jnp.bfloat16, 3e-2, "pallas_interpret"),
    ],
)
def test_half_precision_against_float32_layer(dtype, tol, impl):
    params, masks, x, h0 = _layer_case(3, 48, (16, 16), batch=9)
    out, _ = _run(params, masks, x, h0, (16, 16), impl, dtype=dtype)
    ref, _ = _reference(params, masks, x, h0)
    ref_same_dtype, _ = _reference(params, masks, x, h0, dtype=dtype)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < tol
    assert _rel_err(ref_same_dtype, ref) < tol  # the tolerance is the layer's own rounding


def test_structured_mask_from_layer_init_and_unroll_remainder():
    # A P3 block-diagonal pattern from the layer's own mask_init, read back with 4x4 blocks;
    # T = 5 steps with unroll 3 leaves a remainder; no h0 (zeros).
    hidden = 16
    layer = RecurrentLayer("gru", hidden, recurrent_mask_init=blocks.block_diagonal(4))
    x = np.random.default_rng(4).standard_normal((2, 5, 5)).astype(np.float32)
    variables = layer.init(jax.random.key(4), jnp.asarray(x))
    params = jax.tree_util.tree_map(lambda a: a + 0.1, variables["params"])  # nonzero biases
    ref, ref_last = layer.apply({"params": params, "masks": variables["masks"]}, x)
    weights = kernels.sparse_gru_weights(params, variables["masks"], (4, 4))
    assert weights.w_h.nnzb == 3 * 4  # 3 gates x 4 diagonal modules, each one 4x4 block
    for impl in ("xla", "pallas_interpret"):
        out, last = jax.jit(lambda x, i=impl: kernels.sparse_gru(x, weights, impl=i, unroll=3))(
            x)
        assert _rel_err(out, ref) < 1e-5 and _rel_err(last, ref_last) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_all_blocks_pruned(impl):
    params, masks, x, h0 = _layer_case(8, 12, (4, 4), density=0.0)
    for gate in "rzn":
        masks[f"recurrent_{gate}"]["kernel"][:] = False
    out, _ = _run(params, masks, x, h0, (4, 4), impl)
    ref, _ = _reference(params, masks, x, h0)
    assert _rel_err(out, ref) < 1e-5


def test_persistent_kernel_interpret_single_program():
    # The interpreter runs programs one after another, so only one program can pass the
    # grid barrier: max_programs=1 makes it own every block column (several per program),
    # which tests the time loop, the prefetched inputs, the held panels and the barrier
    # counter; state rows poisoned with NaN must all be written.
    for hidden, block_shape, batch, options in [
        (20, (8, 8), 3, {}),  # held "ell" panels, fma, 3 block columns per program
        (40, (16, 16), 9, dict(compute="dot", hold=False, layout="bsc")),  # BSC walker, dot
    ]:
        params, masks, x, h0 = _layer_case(9, hidden, block_shape, batch=batch, steps=3)
        weights = kernels.sparse_gru_weights(params, masks, block_shape)
        xp = kernels.gru_input_projection(jnp.asarray(x), weights)
        steps = xp.shape[0]
        hbuf = jnp.full(((steps + 1) * batch, hidden), jnp.nan).at[:batch].set(h0)
        with jax.default_matmul_precision("highest"):
            buf, sync = recurrence_pallas.gru_persistent_pallas(
                hbuf, xp, weights.w_h, jnp.asarray(weights.b_hn), hidden=hidden,
                ell=weights.ell, max_programs=1, spin_limit=2, interpret=True, **options)
        assert np.asarray(sync).tolist() == [steps, 0]
        ref, _ = _reference(params, masks, x, h0)
        out = np.asarray(buf[batch:]).reshape(steps, batch, hidden).swapaxes(0, 1)
        assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_step_kernel_writes_every_element(cell):
    # Poison every state row but the initial one with NaN (for the LSTM both the h and the
    # c columns); after T steps no NaN may be left, and both parts match the layer.
    hidden, block_shape, batch, steps = 20, (8, 8), 3, 4
    params, masks, x, h0 = _layer_case(5, hidden, block_shape, batch=batch, steps=steps,
                                       cell=cell)
    carry0 = _carry0(cell, h0, 5)
    weights = SEQUENCE[cell][0](params, masks, block_shape)
    xp = kernels.input_projection(jnp.asarray(x), weights)
    start = np.concatenate(carry0, 1) if cell == "lstm" else h0
    buf = jnp.full(((steps + 1) * batch, start.shape[1]), jnp.nan).at[:batch].set(start)
    c = jnp.zeros((1,), jnp.int32)
    b_hn = jnp.asarray(weights.b_hn) if cell == "gru" else None

    @jax.jit
    def run_steps(buf, c):  # the steps one after another, as separate launches
        with jax.default_matmul_precision("highest"):
            for _ in range(steps):
                buf, c = recurrence_pallas.cell_step_pallas(
                    buf, c, xp, weights.w_h, b_hn, cell=cell, hidden=hidden, interpret=True)
        return buf, c

    buf, c = run_steps(buf, c)
    assert int(c[0]) == steps
    states = np.asarray(buf[batch:]).reshape(steps, batch, -1)
    assert np.isfinite(states).all()
    ref, ref_last = _cell_reference(cell, params, masks, x, carry0)
    assert _rel_err(states[..., :hidden].swapaxes(0, 1), ref) < 1e-5
    if cell == "lstm":  # c_T in the second H columns of the last rows
        assert _rel_err(states[-1, :, hidden:], ref_last[1]) < 1e-5


def test_errors_are_clear():
    params, masks, x, h0 = _layer_case(6, 16, (4, 4))
    bad = {k: dict(v) for k, v in masks.items()}
    bad["recurrent_z"] = {"kernel": np.asarray(bad["recurrent_z"]["kernel"]).copy()}
    bad["recurrent_z"]["kernel"][0, 0] = ~bad["recurrent_z"]["kernel"][0, 0]
    with pytest.raises(ValueError, match="recurrent_z.*not block-structured"):
        kernels.sparse_gru_weights(params, bad, (4, 4))
    with pytest.raises(ValueError, match="recurrent_n"):
        kernels.sparse_gru_weights(params, {k: v for k, v in masks.items()
                                            if k != "recurrent_n"}, (4, 4))
    weights = kernels.sparse_gru_weights(params, masks, (4, 4))
    xp = kernels.gru_input_projection(jnp.asarray(x), weights)
    with pytest.raises(ValueError, match="3·H"):
        kernels.gru_recurrence(xp[..., :-1], weights, impl="xla")
    with pytest.raises(ValueError, match="impl must be"):
        kernels.gru_recurrence(xp, weights, impl="cuda")
    with pytest.raises(ValueError, match='layout="ell"'):
        kernels.gru_recurrence(xp, weights, impl="pallas_interpret", hold=True)
    no_ell = kernels.sparse_gru_weights(params, masks, (4, 4), ell=False)
    with pytest.raises(ValueError, match="ell=True"):
        kernels.gru_recurrence(xp, no_ell, impl="pallas_interpret", layout="ell")
    if not ON_GPU:
        for impl in ("pallas", "persistent"):
            with pytest.raises(ValueError, match="needs a GPU"):
                kernels.gru_recurrence(xp, weights, impl=impl)
    with pytest.raises(ValueError, match="lengths must be"):
        kernels.sparse_gru(jnp.asarray(x), weights, lengths=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="need a forced impl"):
        kernels.sparse_gru(jnp.asarray(x), weights, layout="ell")
    lstm = kernels.sparse_lstm_weights(*_layer_case(6, 16, (4, 4), cell="lstm")[:2], (4, 4))
    with pytest.raises(ValueError, match="pair"):
        kernels.sparse_lstm(jnp.asarray(x), lstm, jnp.asarray(h0), impl="xla")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.sparse_lstm(jnp.asarray(x), lstm, impl="cuda")
    for impl in ("persistent", "persistent_interpret", "mosaic"):  # GRU kernels only
        with pytest.raises(ValueError, match=f"impl='{impl}' runs GRU layers only"):
            kernels.sparse_lstm(jnp.asarray(x), lstm, impl=impl)
    with pytest.raises(ValueError, match='LSTM and RNN weights have none: use layout="bsc"'):
        kernels.sparse_lstm(jnp.asarray(x), lstm, impl="pallas_interpret", layout="ell")
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            kernels.sparse_lstm(jnp.asarray(x), lstm, impl="pallas")


# On a GPU (the device machine): the compiled kernels against the same references.
F16, F32 = (jnp.float16, 5e-3), (jnp.float32, 1e-5)
GPU_CASES = [  # impl, kernel options, batch, (dtype, tolerance)
    ("pallas", {}, 1, F32),
    ("pallas", {}, 20, F32),
    ("persistent", {}, 3, F32),
    ("pallas", {}, 1, F16),
    ("pallas", {}, 20, F16),
    ("pallas", dict(layout="ell"), 8, F16),
    ("pallas", dict(layout="ell", hold=True), 3, F16),
    ("persistent", {}, 1, F16),
    ("persistent", {}, 20, F16),
    ("persistent", dict(hold=False), 5, F16),
    ("persistent", dict(hold=False, layout="bsc"), 5, F16),
    ("persistent", dict(max_programs=3), 2, F16),  # several block columns per program
]


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("impl, options, batch, dtype_tol", GPU_CASES)
def test_gpu_kernels(impl, options, batch, dtype_tol):
    dtype, tol = dtype_tol
    hidden, block_shape = 72, (16, 16)  # 72 = 4.5 blocks: partial edges on both sides
    params, masks, x, h0 = _layer_case(7, hidden, block_shape, batch=batch, steps=9)
    out, last = _run(params, masks, x, h0, block_shape, impl, dtype=dtype, unroll=4, **options)
    ref, ref_last = _reference(params, masks, x, h0)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < tol and _rel_err(last, ref_last) < tol


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("cell", ["lstm", "rnn", "rnn_clipped_relu"])
@pytest.mark.parametrize("batch, dtype_tol", [(1, F32), (20, F32), (1, F16), (20, F16)])
def test_gpu_step_kernel_lstm_rnn(cell, batch, dtype_tol):
    dtype, tol = dtype_tol
    hidden, block_shape, steps = 72, (16, 16), 9  # partial edge blocks on both sides
    params, masks, x, carry0 = _step_kernel_case(7, cell, batch, steps, hidden, block_shape)
    build, run = SEQUENCE[cell]
    weights = build(params, masks, block_shape, dtype=dtype)
    lengths = jnp.asarray((steps - np.arange(batch)) % (steps + 1), jnp.int32)
    with jax.default_matmul_precision("highest"):
        out, last = jax.jit(lambda x, c, n: run(x, weights, c, lengths=n, reverse=True,
                                                impl="pallas", unroll=4))(
            jnp.asarray(x), carry0, lengths)
    ref, ref_last = _cell_reference(cell, params, masks, x, carry0, np.asarray(lengths), True)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < tol
    for g, w in zip(jax.tree_util.tree_leaves(last), jax.tree_util.tree_leaves(ref_last),
                    strict=True):
        assert _rel_err(g, w) < tol


@pytest.mark.parametrize("cell", ["rnn", "rnn_clipped_relu"])
@pytest.mark.parametrize("hidden, block_shape", [(24, (4, 4)), (26, (12, 2)), (20, (8, 8))])
def test_sparse_rnn_matches_recurrent_layer(cell, hidden, block_shape):
    # A vanilla RecurrentLayer with random params and biases, a block-structured recurrent
    # mask (partial edge blocks for 26 / 12x2 and 20 / 8x8), a random input mask, random
    # inputs and h0: the sparse sequence equals the masked dense layer.
    rng = np.random.default_rng(7)
    batch, steps, in_features = 3, 6, 5
    x = rng.standard_normal((batch, steps, in_features)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
    layer = RecurrentLayer(cell, hidden)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    params = jax.tree_util.tree_map(
        lambda a: (rng.standard_normal(a.shape) * (0.5 if a.ndim == 1 else a.shape[0] ** -0.5))
        .astype(np.float32), variables["params"])
    bh, bw = block_shape
    keep = rng.random((-(-hidden // bh), -(-hidden // bw))) < 0.4
    keep[0, -1] = keep[-1, 0] = True
    masks = {"recurrent_h": {"kernel": np.kron(keep, np.ones(block_shape, bool))[:hidden, :hidden]},
             "input_h": {"kernel": rng.random((in_features, hidden)) < 0.7}}
    with jax.default_matmul_precision("highest"):
        ref, ref_last = layer.apply({"params": params, "masks": masks}, jnp.asarray(x),
                                    initial_carry=jnp.asarray(h0))
        weights = kernels.sparse_rnn_weights(params, masks, block_shape, cell=cell)
        out, last = jax.jit(lambda x, h0: kernels.sparse_rnn(x, weights, h0, unroll=2))(
            jnp.asarray(x), jnp.asarray(h0))
    assert out.shape == (batch, steps, hidden) and out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5 and _rel_err(last, ref_last) < 1e-5
    # Without h0 both start from zeros.
    with jax.default_matmul_precision("highest"):
        ref0, _ = layer.apply({"params": params, "masks": masks}, jnp.asarray(x))
        out0, _ = kernels.sparse_rnn(jnp.asarray(x), weights)
    assert _rel_err(out0, ref0) < 1e-5
    # A mask that is not block-structured is refused at construction, naming the kernel.
    masks["recurrent_h"]["kernel"] = rng.random((hidden, hidden)) < 0.5
    with pytest.raises(ValueError, match="recurrent_h"):
        kernels.sparse_rnn_weights(params, masks, block_shape, cell=cell)


# Lengths and direction, LSTM, the persistent kernel's checks, and impl="auto".
SEQUENCE = {"gru": (kernels.sparse_gru_weights, kernels.sparse_gru),
            "lstm": (kernels.sparse_lstm_weights, kernels.sparse_lstm),
            "rnn": (kernels.sparse_rnn_weights, kernels.sparse_rnn),
            "rnn_clipped_relu": (
                lambda p, m, b, **k: kernels.sparse_rnn_weights(p, m, b, cell="rnn_clipped_relu",
                                                                **k), kernels.sparse_rnn)}
LENGTH_IMPLS = [("gru", "xla"), ("gru", "dense"), ("gru", "pallas_interpret"),
                ("gru", "persistent_interpret"), ("lstm", "xla"), ("lstm", "dense"),
                ("rnn", "xla"), ("rnn_clipped_relu", "dense")]
# (the step kernel's LSTM and RNN forms: test_step_kernel_every_cell_matches_recurrent_layer)


def _cell_reference(cell, params, masks, x, carry0, lengths=None, reverse=False, dtype=None):
    layer = RecurrentLayer(cell, np.shape(jax.tree_util.tree_leaves(carry0)[0])[1],
                           reverse=reverse, dtype=dtype)
    with jax.default_matmul_precision("highest"):
        return layer.apply({"params": params, "masks": masks}, jnp.asarray(x),
                           None if lengths is None else jnp.asarray(lengths),
                           initial_carry=jax.tree_util.tree_map(jnp.asarray, carry0))


def _carry0(cell, h0, seed=0):
    if cell != "lstm":
        return h0
    return h0, (0.5 * np.random.default_rng(seed).standard_normal(h0.shape)).astype(np.float32)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell, impl", LENGTH_IMPLS)
def test_lengths_and_reverse_match_recurrent_layer(cell, impl, reverse):
    # Lengths 0 (state stays h0, outputs zero), T, and two in between; partial edge blocks
    # (H = 20, 8x8 blocks); the final carry is each row's state after its last valid step.
    hidden, block_shape, steps = 20, (8, 8), 6
    params, masks, x, h0 = _layer_case(11, hidden, block_shape, batch=4, steps=steps,
                                       cell=cell)
    carry0 = _carry0(cell, h0, 11)
    lengths = np.array([steps, 0, 3, 1], np.int32)
    build, run = SEQUENCE[cell]
    weights = build(params, masks, block_shape)
    options = dict(max_programs=1) if impl.startswith("persistent") else {}

    @jax.jit
    def go(x, carry0, lengths):
        with jax.default_matmul_precision("highest"):
            return run(x, weights, carry0, lengths=lengths, reverse=reverse, impl=impl,
                       unroll=2, **options)

    out, last = go(jnp.asarray(x), carry0, jnp.asarray(lengths))
    ref, ref_last = _cell_reference(cell, params, masks, x, carry0, lengths, reverse)
    assert out.shape == (4, steps, hidden)
    assert _rel_err(out, ref) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves(last), jax.tree_util.tree_leaves(ref_last),
                         strict=True):
        assert _rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)  # length 0: all outputs zero
    np.testing.assert_array_equal(np.asarray(out)[2, 3:], 0.0)
    for got, start in zip(jax.tree_util.tree_leaves(last), jax.tree_util.tree_leaves(carry0),
                          strict=True):
        np.testing.assert_allclose(np.asarray(got)[1], np.asarray(start)[1], rtol=1e-6)
    # Without lengths: reverse alone flips the whole sequence, as the layer does.
    out, last = run(jnp.asarray(x), weights, carry0, reverse=reverse, impl=impl, unroll=2,
                    **options)
    ref, ref_last = _cell_reference(cell, params, masks, x, carry0, None, reverse)
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(jax.tree_util.tree_leaves(last)[0], jax.tree_util.tree_leaves(ref_last)[0]
                    ) < 1e-5


STEP_KERNEL_CASES = [  # cell, kernel options, batch: every cell on the one step kernel
    ("gru", {}, 3),  # the GRU through the same code path, unchanged
    ("lstm", {}, 3),
    ("rnn", {}, 3),
    ("rnn_clipped_relu", {}, 3),
    ("lstm", dict(compute="dot", max_tm=16), 18),  # two batch tiles, the second partial
    ("rnn", dict(compute="fma", rows_per_step=2), 3),  # 4-row blocks straddle loop steps
]


def _step_kernel_case(seed, cell, batch, steps, hidden=22, block_shape=(4, 8)):
    """A layer case with random params whose pre-activations reach tanh's and the clipped
    ReLU's saturated ranges (clip at 0 and 20 both exercised for rnn_clipped_relu)."""
    params, masks, x, h0 = _layer_case(seed, hidden, block_shape, batch=batch, steps=steps,
                                       cell=cell)
    if cell == "rnn_clipped_relu":  # scale so that some units pass 20 and some stay < 0
        params = jax.tree_util.tree_map(lambda a: 5.0 * a, params)
    return params, masks, x, _carry0(cell, 4.0 * h0 if cell == "rnn_clipped_relu" else h0,
                                     seed)


@pytest.mark.parametrize("cell, options, batch", STEP_KERNEL_CASES)
def test_step_kernel_every_cell_matches_recurrent_layer(cell, options, batch):
    # H = 22 with 4x8 blocks: partial edge blocks both ways in every gate; random masks
    # that zero whole blocks; lengths (one 0, one partial), both directions; outputs and
    # every part of the final carry against RecurrentLayer.
    steps = 5
    params, masks, x, carry0 = _step_kernel_case(21, cell, batch, steps)
    build, run = SEQUENCE[cell]
    weights = build(params, masks, (4, 8))
    lengths = np.resize([steps, 0, 2, 4], batch)  # all, none, partial
    if cell == "rnn_clipped_relu":  # the case reaches both clips (else the test is weak)
        ref, _ = _cell_reference(cell, params, masks, x, carry0)
        ref = np.asarray(ref)
        assert (ref == 0).any() and (ref == 20).any()

    @functools.partial(jax.jit, static_argnums=3)
    def go(x, carry0, lengths, reverse):
        with jax.default_matmul_precision("highest"):
            return run(x, weights, carry0, lengths=lengths, reverse=reverse,
                       impl="pallas_interpret", unroll=2, **options)

    for reverse in (False, True) if not options else (True,):  # (variants: one direction)
        out, last = go(jnp.asarray(x), carry0, jnp.asarray(lengths, np.int32), reverse)
        ref, ref_last = _cell_reference(cell, params, masks, x, carry0, lengths, reverse)
        assert out.shape == (batch, steps, 22) and out.dtype == jnp.float32
        assert _rel_err(out, ref) < 1e-5
        got, want = jax.tree_util.tree_leaves(last), jax.tree_util.tree_leaves(ref_last)
        assert len(got) == (2 if cell == "lstm" else 1)
        for g, w in zip(got, want, strict=True):
            assert _rel_err(g, w) < 1e-5


@pytest.mark.parametrize("hidden, block_shape", BLOCK_CASES)
def test_lstm_matches_recurrent_layer(hidden, block_shape):
    params, masks, x, h0 = _layer_case(12, hidden, block_shape, cell="lstm")
    carry0 = _carry0("lstm", h0, 12)
    weights = kernels.sparse_lstm_weights(params, masks, block_shape)
    assert weights.w_h.shape == (hidden, 4 * -(-hidden // block_shape[1]) * block_shape[1])
    with jax.default_matmul_precision("highest"):
        out, (h, c) = jax.jit(lambda x, c0: kernels.sparse_lstm(x, weights, c0, impl="xla",
                                                                unroll=2))(jnp.asarray(x),
                                                                           carry0)
    ref, (ref_h, ref_c) = _cell_reference("lstm", params, masks, x, carry0)
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(h, ref_h) < 1e-5 and _rel_err(c, ref_c) < 1e-5
    # No initial carry: zeros for both h and c, like the layer.
    out0, _ = kernels.sparse_lstm(jnp.asarray(x), weights, impl="xla")
    ref0, _ = _cell_reference("lstm", params, masks, x, (np.zeros_like(h0),) * 2)
    assert _rel_err(out0, ref0) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(jnp.float16, 5e-3), (jnp.bfloat16, 3e-2)])
def test_lstm_half_precision(dtype, tol):
    params, masks, x, h0 = _layer_case(13, 48, (16, 16), batch=5, cell="lstm")
    carry0 = _carry0("lstm", h0, 13)
    weights = kernels.sparse_lstm_weights(params, masks, (16, 16), dtype=dtype)
    out, (h, c) = kernels.sparse_lstm(jnp.asarray(x), weights, carry0, impl="xla")
    ref, _ = _cell_reference("lstm", params, masks, x, carry0)
    assert out.dtype == dtype and c.dtype == dtype
    assert _rel_err(out, ref) < tol


def test_persistent_barrier_failure_raises():
    # The interpreter runs programs one after another, so with two programs the first one's
    # barrier waits can never complete: with a tiny spin limit each gives up, the sync word
    # counts it, and gru_recurrence must raise (eagerly and under jit), never return states.
    params, masks, x, h0 = _layer_case(14, 20, (8, 8), steps=3)
    weights = kernels.sparse_gru_weights(params, masks, (8, 8))
    xp = kernels.input_projection(jnp.asarray(x), weights)
    hbuf = jnp.zeros((4 * 3, 20)).at[:3].set(h0)
    _, sync = recurrence_pallas.gru_persistent_pallas(
        hbuf, xp, weights.w_h, jnp.asarray(weights.b_hn), hidden=20, ell=weights.ell,
        max_programs=2, spin_limit=3, interpret=True)
    assert np.asarray(sync).tolist() == [2 * 3, 3]  # both programs bumped; 3 waits gave up
    opts = dict(impl="persistent_interpret", max_programs=2, spin_limit=3)
    with pytest.raises(Exception, match="barrier waits gave up"):
        np.asarray(kernels.gru_recurrence(xp, weights, jnp.asarray(h0), **opts))
    with pytest.raises(Exception, match="barrier waits gave up"):
        np.asarray(jax.jit(lambda x: kernels.sparse_gru(x, weights, **opts)[0])(
            jnp.asarray(x)))
    # The same kernel with one program passes its barriers and is checked as passing.
    out = kernels.gru_recurrence(xp, weights, jnp.asarray(h0), impl="persistent_interpret",
                                 max_programs=1, spin_limit=3)
    ref, _ = _reference(params, masks, x, h0)
    assert _rel_err(np.swapaxes(np.asarray(out), 0, 1), ref) < 1e-5


def test_persistent_resource_check(monkeypatch):
    # A failed resource check (here injected: the one that compiles a probe needs a GPU)
    # makes a forced persistent kernel raise before launch, naming the limit.
    params, masks, x, h0 = _layer_case(15, 20, (8, 8), steps=2)
    weights = kernels.sparse_gru_weights(params, masks, (8, 8))
    limit = "Shared memory size limit exceeded: requested 247808, available: 232448"
    calls = []

    def unsupported(xp_shape, dtype, w_h, ell, **options):
        calls.append((xp_shape, options))
        return limit

    monkeypatch.setattr(recurrence_pallas, "persistent_unsupported", unsupported)
    with pytest.raises(kernels.ResourceError, match="requested 247808, available: 232448"):
        kernels.sparse_gru(jnp.asarray(x), weights, impl="persistent_interpret",
                           max_programs=1)
    assert calls == [((2, 3, 60), {"max_programs": 1, "interpret": True})]


def test_resource_check_probe_reports_on_cpu():
    # Off a GPU the probe cannot compile the Triton kernel: it reports why instead of
    # raising, so "auto" would skip the candidate.
    if ON_GPU:
        pytest.skip("on a GPU the probe compiles")
    weights = kernels.sparse_gru_weights(*_layer_case(16, 20, (8, 8))[:2], (8, 8))
    reason = recurrence_pallas.persistent_unsupported((4, 3, 60), jnp.float32, weights.w_h,
                                                      weights.ell)
    assert isinstance(reason, str) and reason


def _fake_timer(seconds):
    def timer(thunks):
        assert set(thunks) <= set(seconds), sorted(thunks)
        return {name: seconds[name] for name in thunks}
    return timer


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("winner", ["dense", "xla"])
def test_auto_picks_the_faster_of_dense_and_sparse(cell, winner):
    params, masks, x, h0 = _layer_case(17, 20, (8, 8), cell=cell)
    build, run = SEQUENCE[cell]
    weights = build(params, masks, (8, 8))
    carry0 = _carry0(cell, h0, 17)
    if ON_GPU and cell == "gru" and winner == "xla":
        winner = "pallas"  # on a GPU the GRU's sparse scan candidate is the step kernel
    seconds = dict(dense=2.0, xla=9.0, pallas=9.0, persistent=9.0, mosaic=9.0)
    seconds.update({winner: 1.0})
    with kernels.autotune.using_timer(_fake_timer(seconds)):
        assert kernels.resolve_impl(weights, 3, 5, jnp.float32) == winner
        with jax.default_matmul_precision("highest"):
            out, _ = jax.jit(lambda x: run(x, weights, carry0))(jnp.asarray(x))
        (decision,) = kernels.autotune.decisions().values()
    assert decision["impl"] == winner
    if not ON_GPU:  # the GPU kernels' checks fail here, so they were never candidates
        assert set(decision["times_s"]) == {"dense", "xla"}
    ref, _ = _cell_reference(cell, params, masks, x, carry0)
    assert _rel_err(out, ref) < 1e-5


def test_auto_traced_weights_warn_and_fall_back():
    params, masks, x, h0 = _layer_case(18, 20, (8, 8))
    weights = kernels.sparse_gru_weights(params, masks, (8, 8))

    def never(thunks):
        raise AssertionError("nothing can be timed on traced weights")

    with kernels.autotune.using_timer(never), pytest.warns(UserWarning, match="traced"):
        out, _ = jax.jit(lambda x, w: kernels.sparse_gru(x, w))(jnp.asarray(x), weights)
    ref, _ = _reference(params, masks, x, h0 * 0)
    assert _rel_err(out, ref) < 1e-5


def test_persistent_kernel_runs_weights_built_without_the_ell_layout():
    # Exported models are loaded without the "ell" arrays: the persistent kernel then walks
    # the BSC panels instead of refusing (it used to raise, so `auto` skipped it on GPUs).
    hidden, block_shape = 20, (8, 8)
    params, masks, x, h0 = _layer_case(5, hidden, block_shape, batch=2, steps=4)
    weights = kernels.sparse_gru_weights(params, masks, block_shape, ell=False)
    assert weights.ell is None
    with jax.default_matmul_precision("highest"):
        out, last = kernels.sparse_gru(jnp.asarray(x), weights, jnp.asarray(h0),
                                       impl="persistent_interpret", max_programs=1)
    ref, ref_last = _cell_reference("gru", params, masks, x, h0)
    assert _rel_err(out, ref) < 1e-5 and _rel_err(last, ref_last) < 1e-5


def test_weights_of_a_layer_with_input_norm_are_refused():
    # The kernels compute no layer norm: building from such params must not drop it silently.
    x = jnp.ones((2, 3, 4))
    variables = RecurrentLayer("gru", 8, input_norm=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="projection_norm"):
        kernels.sparse_gru_weights(variables["params"], variables["masks"], (4, 4))


# Both directions of a bidirectional layer as one recurrence (`sparse_bidirectional`).
BIDIRECTIONAL_CASES = [  # cell, hidden, block shape (None: no pair), impl
    ("gru", 8, (4, 4), "dense"), ("gru", 8, (4, 4), "xla"),
    ("gru", 8, (4, 4), "pallas_interpret"), ("lstm", 8, (4, 4), "dense"),
    ("lstm", 8, (2, 4), "xla"), ("rnn_clipped_relu", 8, (4, 8), "dense"),
    ("gru", 10, (4, 4), "xla"),  # bh, bw do not divide H: no pair, falls back to separate
]


def _bidirectional_case(seed, cell, hidden, block_shape, batch, steps):
    """Two independent random layers (seeds ``seed``, ``seed + 1``): (x, forward weights,
    backward weights, their `BidirectionalWeights`, random initial carries of both)."""
    build = SEQUENCE[cell][0]
    params_f, masks_f, x, h_f = _layer_case(seed, hidden, block_shape, batch=batch,
                                            steps=steps, cell=cell)
    params_b, masks_b, _, h_b = _layer_case(seed + 1, hidden, block_shape, batch=batch,
                                            steps=steps, cell=cell)
    forward, backward = build(params_f, masks_f, block_shape), build(params_b, masks_b,
                                                                     block_shape)
    carry0 = (_carry0(cell, h_f, seed), _carry0(cell, h_b, seed + 1))
    return x, forward, backward, kernels.bidirectional_weights(forward, backward), carry0


@pytest.mark.parametrize("cell, hidden, block_shape, impl", BIDIRECTIONAL_CASES)
def test_bidirectional_equals_the_two_directions_run_separately(cell, hidden, block_shape,
                                                                impl):
    # Two independent random layers, lengths with padding (T, 0, partial), random initial
    # carries of both directions; the reference is each direction's own sequence (xla),
    # itself tested against RecurrentLayer above.
    run = SEQUENCE[cell][1]
    x, forward, backward, weights, carry0 = _bidirectional_case(31, cell, hidden, block_shape,
                                                                batch=4, steps=5)
    assert (weights.pair is None) == bool(hidden % block_shape[0] or hidden % block_shape[1])
    lengths = jnp.asarray([5, 0, 3, 1], jnp.int32)

    @jax.jit  # one program: fewer compiles
    def both(x, carry0, lengths):
        with jax.default_matmul_precision("highest"):
            want = [run(x, w, c, lengths=lengths, reverse=r, impl="xla", unroll=2) for w, c, r
                    in zip((forward, backward), carry0, (False, True), strict=True)]
            return want, kernels.sparse_bidirectional(x, weights, carry0, lengths=lengths,
                                                      impl=impl, unroll=2)

    want, (outputs, finals) = both(jnp.asarray(x), carry0, lengths)
    for d in (0, 1):
        assert outputs[d].shape == (4, 5, hidden)
        np.testing.assert_allclose(outputs[d], want[d][0], rtol=1e-5, atol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-6),
                               finals[d], want[d][1])
        np.testing.assert_array_equal(np.asarray(outputs[d])[1], 0.0)  # length 0
        np.testing.assert_array_equal(np.asarray(outputs[d])[2, 3:], 0.0)


@pytest.mark.parametrize("cell, hidden, block_shape, impl", [
    ("gru", 8, (4, 4), "xla"), ("rnn_clipped_relu", 8, (4, 8), "dense"),
    ("lstm", 8, (4, 4), "separate"),
])
def test_projected_bidirectional_equals_each_direction_from_its_projections(
        cell, hidden, block_shape, impl):
    # Each direction reads its own projections (random here, as a layer norm would have
    # changed them): the fused recurrence equals `projected_sequence` per direction.
    _, forward, backward, weights, carry0 = _bidirectional_case(41, cell, hidden, block_shape,
                                                                batch=3, steps=4)
    width = len(GATES[cell]) * hidden
    rng = np.random.default_rng(43)
    xps = tuple(jnp.asarray(rng.normal(0, 1, (3, 4, width)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([4, 0, 2], jnp.int32)
    with jax.default_matmul_precision("highest"):
        want = [kernels.projected_sequence(xp, w, c, lengths=lengths, reverse=r, impl="xla")
                for xp, w, c, r in zip(xps, (forward, backward), carry0, (False, True),
                                       strict=True)]
        outputs, finals = kernels.projected_bidirectional(xps, weights, carry0,
                                                          lengths=lengths, impl=impl)
    for d in (0, 1):
        np.testing.assert_allclose(outputs[d], want[d][0], rtol=1e-5, atol=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-6),
                               finals[d], want[d][1])
    with pytest.raises(ValueError, match="pair"):
        kernels.projected_bidirectional(xps[:1], weights, impl="dense")


def test_bidirectional_pair_kernel_is_block_diagonal():
    # The pair's recurrent kernel, densified, is [[W_f, 0], [0, W_b]] gate by gate.
    build, _ = SEQUENCE["lstm"]
    params_f, masks_f, *_ = _layer_case(33, 8, (4, 2), cell="lstm")
    params_b, masks_b, *_ = _layer_case(34, 8, (4, 2), cell="lstm")
    forward, backward = build(params_f, masks_f, (4, 2)), build(params_b, masks_b, (4, 2))
    pair = np.asarray(kernels.bsc.to_dense(kernels.bidirectional_weights(forward,
                                                                         backward).pair.w_h))
    for g, gate in enumerate(GATES["lstm"]):
        for d, (params, masks) in enumerate(((params_f, masks_f), (params_b, masks_b))):
            want = np.where(masks[f"recurrent_{gate}"]["kernel"],
                            params[f"recurrent_{gate}"]["kernel"], 0)
            cols = slice(g * 16 + d * 8, g * 16 + d * 8 + 8)
            np.testing.assert_array_equal(pair[d * 8:d * 8 + 8, cols], want)
            np.testing.assert_array_equal(pair[(1 - d) * 8:(1 - d) * 8 + 8, cols], 0.0)
    with pytest.raises(ValueError, match="same"):
        kernels.bidirectional_weights(forward, build(params_b, masks_b, (2, 2)))


@pytest.mark.parametrize("winner", ["xla", "separate"])
def test_auto_times_the_fused_forms_against_the_separate_scans(winner):
    params_f, masks_f, x, _ = _layer_case(35, 8, (4, 4))
    params_b, masks_b, *_ = _layer_case(36, 8, (4, 4))
    weights = kernels.bidirectional_weights(kernels.sparse_gru_weights(params_f, masks_f, (4, 4)),
                                            kernels.sparse_gru_weights(params_b, masks_b, (4, 4)))
    if ON_GPU and winner == "xla":
        winner = "pallas"
    seconds = dict(dense=2.0, xla=9.0, pallas=9.0, persistent=9.0, mosaic=9.0, separate=3.0)
    seconds.update({winner: 1.0})
    with kernels.autotune.using_timer(_fake_timer(seconds)):
        assert kernels.resolve_bidirectional_impl(weights, 3, 5) == winner
        decisions = kernels.autotune.decisions()
    (fused,) = [d for k, d in decisions.items() if k.startswith("sparse_bidirectional")]
    assert {"dense", "separate"} <= set(fused["times_s"])
    if not ON_GPU:
        assert set(fused["times_s"]) == {"dense", "xla", "separate"}
    # "separate" measured each direction's own choice first (two more decisions).
    assert len(decisions) == 3
