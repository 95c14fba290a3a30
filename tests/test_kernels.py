"""Block-sparse products (XLA path, Pallas kernel in interpret mode) against x @ (K * mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import kernels
from bsrnn.kernels.bsc import from_dense


def _case(seed, shape, block_shape, density=0.35):
    """Random kernel, random block mask (partial edge blocks when sides don't divide)."""
    rng = np.random.default_rng(seed)
    bh, bw = block_shape
    grid = (-(-shape[0] // bh), -(-shape[1] // bw))
    keep = rng.random(grid) < density
    keep[0, -1] = keep[-1, 0] = True  # both partial edges carry a stored block
    mask = np.kron(keep, np.ones(block_shape, bool))[: shape[0], : shape[1]]
    k = rng.standard_normal(shape).astype(np.float32)
    return rng, k, mask


def _ref(x, k, mask):
    return np.asarray(x, np.float64) @ (k.astype(np.float64) * mask)


def _rel_err(y, ref):
    return np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)


CASES = [  # (in, out), block shape, N
    ((37, 45), (4, 4), 3),
    ((50, 30), (12, 2), 5),
    ((33, 70), (16, 16), 17),
    ((20, 19), (1, 1), 2),
    ((70, 40), (32, 32), 1),
    ((23, 17), (3, 5), 4),
]


@pytest.mark.parametrize("product", ["dot", "fma", "auto"])
@pytest.mark.parametrize("shape, block_shape, n", CASES)
def test_xla_matches_dense_float32(shape, block_shape, n, product):
    rng, k, mask = _case(0, shape, block_shape)
    w = from_dense(k, mask, block_shape)
    x = rng.standard_normal((n, shape[0])).astype(np.float32)
    y = jax.jit(lambda x, w: kernels.bsc_matmul_xla(x, w, product=product))(jnp.asarray(x), w)
    assert y.shape == (n, shape[1]) and y.dtype == jnp.float32
    assert _rel_err(y, _ref(x, k, mask)) < 1e-6


@pytest.mark.parametrize("shape, block_shape, n", [CASES[0], CASES[1], CASES[5]])
def test_precomputed_xla_layout_gives_the_same_products(shape, block_shape, n):
    # with_xla_layout's block column ids and b-major rows: the same products bit for bit as
    # the matrix without them (arguments of jit, where nothing is folded), equal to dense.
    from bsrnn.kernels import bsc

    rng, k, mask = _case(3, shape, block_shape)
    w = from_dense(k, mask, block_shape)
    prepared = bsc.with_xla_layout(w)
    np.testing.assert_array_equal(prepared.col_ids, np.asarray(bsc.block_col_ids(w)))
    np.testing.assert_array_equal(prepared.values_t, np.swapaxes(w.values, 0, 1))
    x = jnp.asarray(rng.standard_normal((n, shape[0])).astype(np.float32))
    for product in ("dot", "fma"):
        fn = jax.jit(lambda x, w, p=product: kernels.bsc_matmul_xla(x, w, product=p))
        y = fn(x, prepared)
        np.testing.assert_array_equal(y, fn(x, w))
        assert _rel_err(y, _ref(x, k, mask)) < 1e-6
    np.testing.assert_array_equal(bsc.to_dense(prepared), bsc.to_dense(w))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(bsc.with_xla_layout)(w)


def test_xla_product_choice():
    # "fma" on the CPU for blocks of at most 256 entries, unless one row meets a block 8 or
    # more wide; "dot" for larger blocks and on every other backend.
    on_cpu = jax.default_backend() == "cpu"
    fma = "fma" if on_cpu else "dot"
    assert kernels.xla.auto_product((4, 4), 1) == fma
    assert kernels.xla.auto_product((12, 2), 8) == fma
    assert kernels.xla.auto_product((16, 16), 8) == fma
    assert kernels.xla.auto_product((16, 16), 1) == "dot"
    assert kernels.xla.auto_product((8, 8), 1) == "dot"
    assert kernels.xla.auto_product((32, 32), 8) == "dot"
    with pytest.raises(ValueError, match="product must be"):
        kernels.bsc_matmul_xla(jnp.ones((2, 37)), from_dense(*_case(0, (37, 45), (4, 4))[1:],
                                                             (4, 4)), product="gemm")


@pytest.mark.parametrize("shape, block_shape, n", CASES[:3] + CASES[5:])
def test_pallas_interpret_matches_dense_float32(shape, block_shape, n):
    rng, k, mask = _case(1, shape, block_shape)
    w = from_dense(k, mask, block_shape)
    x = rng.standard_normal((n, shape[0])).astype(np.float32)
    y = kernels.bsc_matmul(jnp.asarray(x), w, impl="pallas_interpret")
    assert y.shape == (n, shape[1]) and y.dtype == jnp.float32
    assert _rel_err(y, _ref(x, k, mask)) < 1e-6


@pytest.mark.parametrize(
    "compute, transpose_x, n, rows_per_step",
    [("dot", False, 20, 16), ("dot", True, 20, 16), ("fma", False, 5, 8), ("fma", True, 3, 32)],
)
def test_pallas_paths_row_tiles_and_short_steps(compute, transpose_x, n, rows_per_step):
    # 12x2 blocks with few panel rows per step, so blocks straddle loop steps; for "dot",
    # N = 20 with 16-row tiles gives two row tiles, the second partial.
    rng, k, mask = _case(2, (61, 26), (12, 2), density=0.6)
    w = from_dense(k, mask, (12, 2))
    x = rng.standard_normal((n, 61)).astype(np.float32)
    y = kernels.bsc_matmul_pallas(
        jnp.asarray(x),
        w,
        interpret=True,
        compute=compute,
        transpose_x=transpose_x,
        max_tm=16,
        rows_per_step=rows_per_step,
    )
    assert _rel_err(y, _ref(x, k, mask)) < 1e-6


@pytest.mark.parametrize("impl", ["xla_dot", "xla_fma", "pallas_interpret"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(impl, dtype):
    rng, k, mask = _case(3, (45, 38), (8, 4))
    w = from_dense(k, mask, (8, 4), dtype=dtype)
    x = rng.standard_normal((6, 45)).astype(np.float32)
    if impl.startswith("xla_"):
        y = kernels.bsc_matmul_xla(jnp.asarray(x, dtype), w, product=impl.removeprefix("xla_"))
    else:
        y = kernels.bsc_matmul(jnp.asarray(x, dtype), w, impl=impl)
    assert y.dtype == dtype
    # Reference on the rounded operands: the error left is the output rounding.
    xr = np.asarray(jnp.asarray(x, dtype), np.float32)
    kr = np.asarray(jnp.asarray(k, dtype), np.float32)
    assert _rel_err(y.astype(jnp.float32), _ref(xr, kr, mask)) < 1e-2


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_leading_dims_mixed_dtype_and_jit(impl):
    rng, k, mask = _case(4, (24, 20), (4, 4))
    w = from_dense(k, mask, (4, 4), dtype=jnp.bfloat16)  # bf16 weights, fp32 activations
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    y = jax.jit(lambda x, w: kernels.bsc_matmul(x, w, impl=impl))(jnp.asarray(x), w)
    assert y.shape == (2, 3, 20) and y.dtype == jnp.float32
    kr = np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32)
    assert _rel_err(y, _ref(x, kr, mask)) < 1e-6


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_all_blocks_pruned_gives_zeros(impl):
    rng = np.random.default_rng(5)
    w = from_dense(rng.standard_normal((9, 7)).astype(np.float32), np.zeros((9, 7), bool), (4, 4))
    x = jnp.asarray(rng.standard_normal((3, 9)), jnp.float32)
    y = kernels.bsc_matmul(x, w, impl=impl)
    assert y.shape == (3, 7)
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def _fake_timer(seconds):
    return lambda thunks: {name: seconds[name] for name in thunks}


@pytest.mark.parametrize("winner", ["dense", "xla"])
def test_auto_picks_the_faster_of_dense_and_sparse(winner):
    rng, k, mask = _case(6, (40, 24), (4, 4))
    w = from_dense(k, mask, (4, 4))
    x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    seconds = {"dense": 1.0, "xla": 2.0, "pallas": 3.0} if winner == "dense" else \
        {"dense": 2.0, "xla": 1.0, "pallas": 3.0}
    with kernels.autotune.using_timer(_fake_timer(seconds)):
        with jax.default_matmul_precision("highest"):
            y = jax.jit(lambda x: kernels.bsc_matmul(x, w))(x)  # traced x, concrete w
        assert kernels.matmul_impl(w, 6, jnp.float32) == winner
        (decision,) = kernels.autotune.decisions().values()
    assert decision["impl"] == winner
    if jax.default_backend() != "gpu":
        assert decision["skipped"] == {"pallas": "needs a GPU"}
    assert y.shape == (2, 3, 24)
    assert _rel_err(y.reshape(6, 24), _ref(x.reshape(6, 40), k, mask)) < 1e-6


def test_autotune_choose_skips_failing_candidates_and_caches(tmp_path):
    # A candidate whose resource check fails and one that raises when first run are
    # skipped; the rest are timed; the decision is kept in memory and in the cache file,
    # and read back from the file without timing again.
    runs = []

    def make(name):
        def thunk():
            runs.append(name)
            if name == "crashes":
                raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
            return jnp.ones(())
        return thunk

    candidates = {"dense": lambda: None, "fast": lambda: None, "crashes": lambda: None,
                  "too_big": lambda: "needs 300 KB of shared memory, 227 KB available"}
    path = str(tmp_path / "autotune.json")
    with kernels.autotune.using_timer(_fake_timer({"dense": 2.0, "fast": 1.0})):
        kernels.autotune.set_cache_file(path)
        assert kernels.autotune.choose("op|k", candidates, make) == "fast"
        assert kernels.autotune.choose("op|k", candidates, make) == "fast"  # cached
        decision = kernels.autotune.decisions()["op|k"]
    assert runs == ["dense", "fast", "crashes"]  # each compiled/run once; too_big never
    assert decision["times_s"] == {"dense": 2.0, "fast": 1.0}
    assert set(decision["skipped"]) == {"crashes", "too_big"}
    assert "Shared memory" in decision["skipped"]["crashes"]

    def never(thunks):
        raise AssertionError("read from the file, not timed")

    with kernels.autotune.using_timer(never):
        kernels.autotune.set_cache_file(path)
        assert kernels.autotune.choose("op|k", candidates, make) == "fast"
    with kernels.autotune.using_timer(never), pytest.raises(RuntimeError, match="no impl"):
        kernels.autotune.choose("op|none", {"a": lambda: "no"}, make)


def test_dispatch_and_errors():
    rng, k, mask = _case(6, (16, 16), (4, 4))
    w = from_dense(k, mask, (4, 4))
    x = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    for impl in ("dense", "xla"):
        np.testing.assert_allclose(np.asarray(kernels.bsc_matmul(x, w, impl=impl)),
                                   _ref(x, k, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be"):
        kernels.bsc_matmul(x, w, impl="cusparse")
    with pytest.raises(ValueError, match="expects 16"):
        kernels.bsc_matmul(x[:, :15], w, impl="xla")
    with pytest.raises(ValueError, match="N <= 8"):
        kernels.bsc_matmul_pallas(jnp.ones((9, 16)), w, interpret=True, compute="fma")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            kernels.bsc_matmul(x, w, impl="pallas")
