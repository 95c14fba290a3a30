"""Block tiling and reductions against hand-computed masks and a NumPy loop reference."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import blocks

NUMPY_REDUCTIONS = {
    "max": np.max,
    "mean": np.mean,
    "rms": lambda a: np.sqrt(np.mean(a**2)),
    "geomean": lambda a: np.exp(np.mean(np.log(a))),
    "median": np.median,
}


def numpy_scores(w, block_shape, reduction):
    """Loop over blocks, slicing what each (possibly partial) block holds."""
    bh, bw = block_shape
    rows, cols = w.shape
    out = np.zeros((math.ceil(rows / bh), math.ceil(cols / bw)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = np.abs(w[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]).astype(np.float64)
            out[i, j] = NUMPY_REDUCTIONS[reduction](block)
    return out


def test_p1_toy_example_exact_mask():
    # P1's toy: a 4x4 matrix, 2x2 blocks, max reduction, threshold 0.5.
    w = np.array(
        [
            [0.1, -0.2, 0.9, 0.0],
            [0.3, 0.05, -0.1, 0.2],
            [-0.6, 0.1, 0.3, 0.4],
            [0.0, 0.2, -0.45, 0.1],
        ],
        np.float32,
    )
    scores = blocks.block_scores(jnp.asarray(w), (2, 2), "max")
    np.testing.assert_allclose(scores, [[0.3, 0.9], [0.6, 0.45]], rtol=1e-6)
    keep = blocks.expand_blocks(scores >= 0.5, (2, 2), (4, 4))
    expected = np.array(
        [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool
    )
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("reduction", blocks.REDUCTIONS)
@pytest.mark.parametrize(
    "shape,block_shape", [((8, 8), (4, 4)), ((10, 7), (4, 3)), ((30, 9), (12, 2)), ((5, 5), (1, 1))]
)
def test_reductions_match_numpy(reduction, shape, block_shape):
    rng = np.random.default_rng(hash((reduction, shape)) % 2**32)
    w = rng.standard_normal(shape).astype(np.float32)
    got = blocks.block_scores(jnp.asarray(w), block_shape, reduction)
    np.testing.assert_allclose(got, numpy_scores(w, block_shape, reduction), rtol=2e-5)


def test_geomean_of_block_with_a_zero_is_zero():
    w = jnp.array([[0.0, 2.0], [3.0, 4.0]])
    assert float(blocks.block_scores(w, (2, 2), "geomean")[0, 0]) == 0.0


def test_gates_are_tiled_separately():
    # A fused (in, 3H) kernel with H = 6 and 4-wide blocks: each gate has a partial edge block.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 18)).astype(np.float32)
    got = np.asarray(blocks.block_scores(jnp.asarray(w), (4, 4), "max", num_gates=3))
    expected = np.concatenate(
        [numpy_scores(g, (4, 4), "max") for g in np.split(w, 3, axis=1)], axis=1
    )
    assert got.shape == blocks.grid_shape((8, 18), (4, 4), num_gates=3) == (2, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Expanding one value per block puts block (0, 2) (gate 1's first block) on columns 6..9.
    grid = np.zeros((2, 6), bool)
    grid[0, 2] = True
    full = np.asarray(blocks.expand_blocks(jnp.asarray(grid), (4, 4), (8, 18), num_gates=3))
    assert full.sum() == 16 and full[:4, 6:10].all()


def test_block_norms_match_numpy():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((7, 10)).astype(np.float32)
    got = blocks.block_norms(jnp.asarray(w), (3, 4))
    expected = numpy_scores(w, (3, 4), "rms") * np.sqrt(
        [[min(3, 7 - 3 * i) * min(4, 10 - 4 * j) for j in range(3)] for i in range(3)]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_block_diagonal_pattern():
    mask = blocks.block_diagonal(2)((4, 6))
    expected = np.array(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]], bool
    )
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(blocks.block_diagonal(3)((3, 3)), np.eye(3, dtype=bool))
    assert blocks.block_diagonal(1)((5, 5)).all()


@pytest.mark.parametrize(
    "block_shape,match",
    [((0, 4), "positive"), ((-2, 2), "positive"), ((9, 2), "larger"), ((2, 17), "larger"),
     ((4,), "pair"), ((2.5, 2), "pair")],
)
def test_bad_block_shapes(block_shape, match):
    with pytest.raises(ValueError, match=match):
        blocks.block_scores(jnp.ones((8, 16)), block_shape)


def test_bad_reduction_and_modules():
    with pytest.raises(ValueError, match="unknown block reduction 'l1'.*max"):
        blocks.block_scores(jnp.ones((4, 4)), (2, 2), "l1")
    with pytest.raises(ValueError, match="block_diagonal\\(3\\) cannot split a 4x4"):
        blocks.block_diagonal(3)((4, 4))
    with pytest.raises(ValueError, match="positive module count"):
        blocks.block_diagonal(0)
