"""The recurrence's hoisted VJP (``weight_grad="hoisted"``, `bsrnn.cells.hoisted_recurrence`):
gradients w.r.t. every input and param against plain JAX autodiff of the scan (a scan
written here, and the layer's own ``weight_grad="scan"``), for every cell, dense,
block-diagonal and frozen block-sparse kernels (partial edge blocks), reverse, lengths with
padding and non-zero initial carries; under ``jax.vmap``; and the structure that makes it
cheaper: no weight-sized accumulator in the backward scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core

from bsrnn import blocks, cells
from bsrnn import nnx as bnnx
from bsrnn.kernels import sparse_training

B, T, D, H = 3, 5, 4, 10  # H = 10 with 4x4 blocks: partial edge blocks
BLOCKS = (4, 4)


def assert_trees_close(got, want, rtol=2e-5, atol=2e-6):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree_util.tree_leaves(want), strict=True):
        assert g.dtype == w.dtype, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def normal(seed, *shape, scale=1.0):
    """Fresh random inputs from numpy (no per-op compiles), as float32 device arrays."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def random_variables(layer, x, seed):
    """Random params and the layer's masks, without running its (slow to compile) init:
    normal kernels of scale 0.4 (biases too), all-ones masks, block-diagonal recurrent masks
    for G > 1."""
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    leaves, treedef = jax.tree_util.tree_flatten(shapes["params"])
    params = treedef.unflatten([normal(seed + i, *p.shape, scale=0.4)
                                for i, p in enumerate(leaves)])

    def mask(path, m):
        if layer.recurrent_modules > 1 and "recurrent" in jax.tree_util.keystr(path):
            return jnp.asarray(blocks.block_diagonal(layer.recurrent_modules)(m.shape))
        return jnp.ones(m.shape, bool)

    return {"params": params,
            "masks": jax.tree_util.tree_map_with_path(mask, shapes["masks"])}


def random_carry(cell, seed, shape):
    h = normal(seed, *shape)
    return (h, normal(seed + 1, *shape)) if cell == "lstm" else h


def valid_steps(lengths):
    """(T, B) bool: step t of row b is before its length."""
    return jnp.asarray(np.arange(T)[:, None] < np.asarray(lengths)[None])


def reference_scan(cell, x_proj, valid, carry, w_h, b_h):
    """The recurrence as a plain ``lax.scan`` written out here (autodiff reference)."""

    def step(carry, inputs):
        x_t, valid_t = inputs
        new_carry, out = cells.cell_step(cell, carry, x_t, w_h, b_h)
        if valid_t is None:
            return new_carry, out
        new_carry = jax.tree_util.tree_map(lambda n, o: jnp.where(valid_t[:, None], n, o),
                                           new_carry, carry)
        return new_carry, jnp.where(valid_t[:, None], out, 0)

    return jax.lax.scan(step, carry, (x_proj, valid))


@pytest.mark.parametrize("cell,padded,unroll", [
    ("gru", True, 1), ("lstm", True, 2), ("rnn", False, 1), ("rnn_clipped_relu", True, 3)])
def test_hoisted_recurrence_matches_autodiff_of_a_plain_scan(cell, padded, unroll):
    gates = len(cells.GATES[cell])
    seed = 10 * len(cell) + unroll
    x_proj = normal(seed, T, B, gates * H, scale=3.0 if cell == "rnn_clipped_relu" else 1.0)
    w_h = normal(seed + 1, H, gates * H, scale=1 / np.sqrt(H))
    b_h = normal(seed + 2, gates * H)
    carry = random_carry(cell, seed + 3, (B, H))
    valid = valid_steps([T, 2, 0]) if padded else None
    ct_out, ct_carry = normal(seed + 5, T, B, H), normal(seed + 6, B, H)

    def loss(run, x_proj, carry, w_h, b_h):
        final, out = run(cell, x_proj, valid, carry, w_h, b_h)
        final_h = final[0] + 0.5 * final[1] if cell == "lstm" else final
        return jnp.sum(out * ct_out) + jnp.sum(jnp.sin(final_h) * ct_carry)

    hoisted = functools.partial(cells.hoisted_recurrence, cell, unroll)

    @jax.jit
    def both(*args):
        return [jax.grad(functools.partial(loss, run), argnums=(0, 1, 2, 3))(*args)
                for run in (lambda c, *a: hoisted(*a), reference_scan)]

    grads, want = both(x_proj, carry, w_h, b_h)
    assert_trees_close(grads, want)
    assert all(np.max(np.abs(g)) > 1e-3 for g in jax.tree_util.tree_leaves(want))
    if padded:  # padding rows: no gradient into x_proj past the lengths
        assert np.all(np.asarray(grads[0])[2:, 1] == 0) and np.all(np.asarray(grads[0])[:, 2] == 0)


def frozen_layer(layer, masks):
    """``masks`` with random 4x4-block recurrent masks, and ``layer`` frozen on them."""
    masks = jax.tree_util.tree_map(lambda m: m, masks)
    rng = np.random.default_rng(100)
    for gate in cells.GATES[layer.cell]:
        keep = rng.random(blocks.grid_shape((H, H), BLOCKS)) < 0.5
        masks[f"recurrent_{gate}"]["kernel"] = jnp.asarray(
            np.kron(keep, np.ones(BLOCKS, bool))[:H, :H])
    frozen = {"": sparse_training.freeze({"layer": masks}, BLOCKS)["layer"]}
    return layer.clone(frozen_recurrent=frozen), masks


CASES = [  # (cell, recurrent kernel, reverse); every cell's dense scan is tested above
    ("gru", "dense", True), ("gru", "G=2", False), ("lstm", "G=4", True),
    ("rnn_clipped_relu", "G=2", True), ("gru", "frozen", False), ("lstm", "frozen", True),
]


@pytest.mark.parametrize("cell,kernel,reverse", CASES)
def test_layer_gradients_match_the_scan_autodiff(cell, kernel, reverse):
    """Gradients w.r.t. params, inputs and the initial carry through ``RecurrentLayer``."""
    hidden = 12 if kernel == "G=4" else H
    modules = int(kernel[2:]) if kernel.startswith("G=") else 1
    layer = cells.RecurrentLayer(cell, hidden, reverse=reverse, recurrent_modules=modules)
    seed = 100 * len(cell) + 10 * modules + reverse
    x = normal(seed, B, T, D)
    lengths = jnp.array([T, 2, 0])
    carry = random_carry(cell, seed + 1, (B, hidden))
    ct = normal(seed + 3, B, T, hidden)
    variables = random_variables(layer, x, seed + 4)
    masks = variables["masks"]
    if kernel == "frozen":
        layer, masks = frozen_layer(layer, masks)

    @jax.jit
    def grads(params, x, carry):
        def loss(params, x, carry, weight_grad):
            y, final = layer.clone(weight_grad=weight_grad).apply(
                {"params": params, "masks": masks}, x, lengths, carry)
            return jnp.sum(jnp.tanh(y) * ct) + sum(jnp.sum(f ** 2) for f in
                                                   jax.tree_util.tree_leaves(final))

        return [jax.grad(loss, argnums=(0, 1, 2))(params, x, carry, w)
                for w in ("hoisted", "scan")]

    got, want = grads(variables["params"], x, carry)
    assert_trees_close(got, want)
    recurrent = [g for path, g in jax.tree_util.tree_flatten_with_path(got[0])[0]
                 if "recurrent" in jax.tree_util.keystr(path)]
    assert all(np.max(np.abs(g)) > 1e-3 for g in recurrent)


def test_bfloat16_layer_gradients_keep_their_dtype_and_values():
    layer = cells.RecurrentLayer("gru", H, dtype=jnp.bfloat16)
    x = normal(20, B, T, D)
    lengths = jnp.array([T, 3, 1])
    variables = random_variables(layer, x, 21)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), variables["params"])
    ct = normal(22, B, T, H)

    @jax.jit
    def grads(params, x):
        def loss(params, weight_grad):
            y, _ = layer.clone(weight_grad=weight_grad).apply(
                {"params": params, "masks": variables["masks"]}, x, lengths)
            return jnp.sum(y.astype(jnp.float32) * ct)

        return [jax.grad(loss)(params, w) for w in ("hoisted", "scan")]

    got, want = grads(params, x)
    scale = max(np.max(np.abs(np.asarray(w, np.float32))) for w in jax.tree_util.tree_leaves(want))
    assert_trees_close(got, want, rtol=3e-2, atol=3e-2 * scale)  # bf16: ~3 digits, summed
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(got))


def test_vmapped_train_gradients_match_per_member_autodiff():
    """The ``--vmap`` sweeps vmap the whole gradient: members with different params."""
    layer = cells.RecurrentLayer("lstm", 8, recurrent_modules=2)
    x = normal(30, B, T, D)
    lengths = jnp.array([4, T, 1])
    target = normal(31, B, T, 8)
    variables = [random_variables(layer, x, seed) for seed in (32, 52)]
    members = jax.tree_util.tree_map(lambda *p: jnp.asarray(np.stack(p)),
                                     *(v["params"] for v in variables))

    def grad(params, weight_grad):
        def loss(params):
            y, _ = layer.clone(weight_grad=weight_grad).apply(
                {"params": params, "masks": variables[0]["masks"]}, x, lengths)
            return jnp.mean((y - target) ** 2)

        return jax.grad(loss)(params)

    got = jax.jit(jax.vmap(functools.partial(grad, weight_grad="hoisted")))(members)
    scan = jax.jit(functools.partial(grad, weight_grad="scan"))
    for i in range(2):
        assert_trees_close(jax.tree_util.tree_map(lambda g, i=i: np.asarray(g)[i], got),
                           scan(variables[i]["params"]))


def scan_carry_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The carry shapes of every ``scan`` in ``jaxpr`` and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            start = eqn.params["num_consts"]
            shapes += [v.aval.shape for v in eqn.invars[start:start + eqn.params["num_carry"]]]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    shapes += scan_carry_shapes(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    shapes += scan_carry_shapes(sub)
    return shapes


@pytest.mark.parametrize("kernel", ["dense", "frozen"])
def test_the_backward_scan_accumulates_no_weight_gradient(kernel):
    """Plain autodiff carries dW (dense: (H, 3H); frozen: the kept blocks (nnzb, 4, 4)) and
    db through the backward scan; the hoisted VJP carries only the state's cotangent."""
    layer = cells.RecurrentLayer("gru", H)
    x = normal(40, B, T, D)
    variables = random_variables(layer, x, 41)
    masks = variables["masks"]
    weight_shape = (H, 3 * H)
    if kernel == "frozen":
        layer, masks = frozen_layer(layer, masks)
        weight_shape = (layer.frozen_recurrent[""].nnzb, *BLOCKS)

    def carries(weight_grad):
        def loss(params):
            y, _ = layer.clone(weight_grad=weight_grad).apply({"params": params, "masks": masks},
                                                              x)
            return jnp.sum(y ** 2)

        return scan_carry_shapes(jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr)

    assert weight_shape in carries("scan")
    assert set(carries("hoisted")) == {(B, H)}


def test_forward_mode_runs_with_the_scan_and_agrees_with_the_hoisted_vjp():
    layer = cells.RecurrentLayer("gru", H)
    x = normal(50, B, T, D)
    lengths = jnp.array([T, 2, 4])
    variables = random_variables(layer, x, 51)
    direction = random_variables(layer, x, 71)["params"]

    def loss(params, weight_grad):
        y, _ = layer.clone(weight_grad=weight_grad).apply(
            {"params": params, "masks": variables["masks"]}, x, lengths)
        return jnp.sum(jnp.sin(y))

    @jax.jit
    def both(params, direction):
        _, tangent = jax.jvp(lambda p: loss(p, "scan"), (params,), (direction,))
        grads = jax.grad(loss)(params, "hoisted")
        return tangent, sum(jnp.sum(g * d) for g, d in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction), strict=True))

    tangent, dot = both(variables["params"], direction)
    np.testing.assert_allclose(tangent, dot, rtol=1e-5)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: loss(p, "hoisted"), (variables["params"],), (direction,))


def test_bad_weight_grad_and_product_impl_are_refused():
    x = jnp.ones((1, 2, 3))
    with pytest.raises(ValueError, match="weight_grad='autodiff'"):
        cells.RecurrentLayer("gru", 4, weight_grad="autodiff").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="weight_grad='autodiff'"):
        bnnx.RecurrentLayer("gru", 3, 4, weight_grad="autodiff", rngs=nnx.Rngs(0))
    mask = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="impl='triton'"):
        sparse_training.FrozenBlocks.from_masks([mask], ("h",), (2, 2), impl="triton")
    frozen = sparse_training.FrozenBlocks.from_masks([mask], ("h",), (2, 2))
    assert frozen.product_impl() == ("pallas" if jax.default_backend() == "gpu" else "xla")


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_frozen_kernel_products_against_the_dense_masked_kernel(impl):
    """Both per-step products of a frozen kernel, h @ W_h and the dh-only dp @ W_hᵀ of the
    backward scan, against the dense masked (H, 3H) kernel; ``impl="pallas_interpret"``
    runs the dispatcher's Pallas kernel (what ``"auto"`` runs on GPUs) in the interpreter."""
    rng = np.random.default_rng(70)
    masks = [np.kron(rng.random((3, 3)) < 0.5, np.ones(BLOCKS, bool))[:H, :H] for _ in "rzn"]
    kernels = [normal(71 + g, H, H) for g in range(3)]
    frozen = sparse_training.FrozenBlocks.from_masks(masks, ("r", "z", "n"), BLOCKS, impl)
    dense = np.concatenate([np.where(m, k, 0) for m, k in zip(masks, kernels, strict=True)], 1)
    h, dp = normal(75, 2, H), normal(76, 2, 3 * H)

    @jax.jit
    def products(kernels, h, dp):
        kernel = sparse_training.SparseRecurrentKernel(
            sparse_training.gather_blocks(frozen, kernels), frozen)
        return (cells.recurrent_product(h, kernel),
                cells.recurrent_product_transpose(dp, kernel, h))

    y, dh = products(kernels, h, dp)
    np.testing.assert_allclose(y, h @ dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, dp @ dense.T, rtol=1e-5, atol=1e-5)
