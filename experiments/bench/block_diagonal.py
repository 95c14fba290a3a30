"""Training time of P3's block-diagonal recurrent layers run as G independent products
against the masked dense layer with the same params and masks.

Baselines, both ``bsrnn.cells.RecurrentLayer(cell, H)`` with P3's block-diagonal masks (every
step one dense (B, H) @ (H, gates·H) product; the mask only zeroes weights): "masked dense,
scan autodiff" (``weight_grad="scan"``: plain JAX autodiff of the scan, whose backward adds
the recurrent weight gradient into a (H, gates·H) accumulator at every step), and "masked
dense, hoisted VJP" (``weight_grad="hoisted"``, the default: the weight gradient in one
product after the backward scan). Ours: ``RecurrentLayer(cell, H, recurrent_modules=G)``
with the hoisted VJP, the same params and masks, each step G products (B, H/G) @
(H/G, gates·H/G) (a batched einsum). The input kernels stay dense in all. G = 1 runs the
dense hoisted code again (its ratio against it is the noise). The dense layers' cost does
not depend on the masks' values, so they are timed once per cell.

Timed, per cell, every variant and G interleaved in one process (median of ``--repeats``
after warm-up), each one jitted call:

* ``layer``: forward and backward of the layer (gradients of a random projection of the
  outputs w.r.t. the params and the inputs), T steps, inputs of width D = H;
* ``input projection``: forward and backward of the layer's input product alone
  (x @ W_i + b_i of all steps, the same dense work in both), so that ``recurrent``,
  ``layer - input projection``, is the time of the recurrence itself;
* ``products``: the recurrent products alone, forward, T steps of
  h <- tanh((h @ W_h)[first H columns]) in a ``lax.scan`` (``bsrnn.cells.recurrent_product``
  on the dense (H, gates·H) kernel against the (G, H/G, gates·H/G) blocks): the most the
  layer can gain, the rest of a step (gate math, the scan's stores) costing the same in both;
* ``train step``: a whole optimizer step of the layer on a mean squared error (Adam and
  ``keep_masked``, as P3's ``structural`` method).

``--timed`` picks which (``layer`` brings ``recurrent``). ``--kernels`` (GPU) then traces
the products and the hoisted layers once more and prints, per variant, the GPU kernels per
step: launches and µs by kernel name (the profile of where a step's time goes).

Each G row checks that the G modules compute the masked dense layer's numbers on this device
(largest difference of the outputs, at the default matmul precision).

    python experiments/bench/block_diagonal.py --hidden=512 --steps=32 --repeats=5   # CPU
    python experiments/bench/block_diagonal.py --unroll=8 --json=bd_h200.json \\
        --markdown=bd_h200.md                                                     # H200

The GPU defaults are issue 14's target shape: H = 2048, batch 32, G = 1, 2, 4, 8, 16, GRU and
LSTM (target: G = 8's recurrent time >= 3x lower than dense).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsrnn import blocks, cells, pruning


def layer_grad(layer: cells.RecurrentLayer, variables: Any, x: jax.Array,
               cotangent: jax.Array) -> Callable[[], Any]:
    """A jitted forward + backward of ``layer``: the thunk returns the gradients."""

    @jax.jit
    def grads(params, masks, x):
        def loss(params, x):
            y, _ = layer.apply({"params": params, "masks": masks}, x)
            return jnp.sum(y * cotangent)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    return functools.partial(grads, variables["params"], variables["masks"], x)


def projection_grad(cell: str, x: jax.Array, hidden: int) -> Callable[[], Any]:
    """Forward + backward of the input product of all steps, x (B, T, D) @ (D, gates·H)."""
    width = len(cells.GATES[cell]) * hidden
    w = jax.random.normal(jax.random.key(2), (x.shape[-1], width)) / np.sqrt(x.shape[-1])
    b = jnp.zeros((width,))
    cotangent = jax.random.normal(jax.random.key(3), (*x.shape[:2], width))

    @jax.jit
    def grads(w, b, x):
        return jax.grad(lambda w, b, x: jnp.sum((jnp.dot(x, w) + b) * cotangent),
                        argnums=(0, 1, 2))(w, b, x)

    return functools.partial(grads, w, b, x)


def product_scan(cell: str, hidden: int, modules: int, batch: int,
                 steps: int) -> Callable[[], Any]:
    """T steps of the recurrent product alone (see the module docstring), dense for
    ``modules=1``, else G blocks."""
    width = len(cells.GATES[cell]) * hidden // modules
    shape_h, shape_w = (batch, hidden), (hidden, width)
    if modules > 1:
        shape_h, shape_w = (modules, batch, hidden // modules), (modules, hidden // modules, width)
    h = jax.random.normal(jax.random.key(4), shape_h)
    w = jax.random.normal(jax.random.key(5), shape_w) / np.sqrt(shape_w[-2])

    @jax.jit
    def run(h, w):
        def step(h, _):
            return jnp.tanh(cells.recurrent_product(h, w)[..., : h.shape[-1]]), None

        return jax.lax.scan(step, h, None, length=steps)[0]

    return functools.partial(run, h, w)


def train_step(layer: cells.RecurrentLayer, variables: Any, x: jax.Array,
               target: jax.Array) -> Callable[[], Any]:
    """A jitted Adam + ``keep_masked`` step on ``mean((layer(x) - target)²)``; the thunk
    runs one step and keeps the new state for the next call."""
    tx = optax.chain(optax.adam(1e-4), pruning.keep_masked())
    masks = variables["masks"]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state):
        def loss(params):
            y, _ = layer.apply({"params": params, "masks": masks}, x)
            return jnp.mean((y - target) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.tree_util.tree_map(jnp.copy, variables["params"])
    state = [params, tx.init(params)]

    def run():
        state[0], state[1], value = step(*state)
        return value

    return run


def median_times(thunks: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each thunk: two warm-up calls each (compiles), then
    ``repeats`` rounds that call every thunk once, so drift hits all alike."""
    for thunk in thunks.values():
        for _ in range(2):
            jax.block_until_ready(thunk())
    times = {name: [] for name in thunks}
    for _ in range(repeats):
        for name, thunk in thunks.items():
            start = time.perf_counter()
            jax.block_until_ready(thunk())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def block_diagonal_masks(masks: Any, modules: int) -> Any:
    """``masks`` with every recurrent mask replaced by P3's ``block_diagonal(G)``."""
    def replace(path, mask):
        if "recurrent" not in jax.tree_util.keystr(path):
            return mask
        return jnp.asarray(blocks.block_diagonal(modules)(mask.shape), bool)

    return jax.tree_util.tree_map_with_path(replace, masks)


# The variants timed per cell, by label: the masked dense layer differentiated by plain
# autodiff of the scan (the old baseline), the masked dense layer with the hoisted VJP, and
# the G modules with the hoisted VJP (one row per G; G = 1 runs the dense hoisted code again).
DENSE_SCAN, DENSE_HOISTED = "masked dense, scan autodiff", "masked dense, hoisted VJP"


def bench(cell: str, modules_list: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The timings of one cell, every G of ``modules_list``: see the module docstring."""
    kx, kc, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, args.steps, args.hidden))
    cotangent = jax.random.normal(kc, (args.batch, args.steps, args.hidden))
    target = jax.random.normal(kt, (args.batch, args.steps, args.hidden))
    common = dict(cell=cell, features=args.hidden, unroll=args.unroll)
    dense_scan = cells.RecurrentLayer(weight_grad="scan", **common)
    dense_hoisted = cells.RecurrentLayer(weight_grad="hoisted", **common)
    variables = jax.jit(dense_scan.init)(jax.random.key(1), x)
    # The dense layers' cost does not depend on the mask's values: timed once, with G_max's.
    dense_vars = {"params": variables["params"],
                  "masks": block_diagonal_masks(variables["masks"], max(modules_list))}
    kinds = args.timed.split(",")
    thunks = {}
    if "layer" in kinds:
        thunks[f"{DENSE_SCAN} layer"] = layer_grad(dense_scan, dense_vars, x, cotangent)
        thunks[f"{DENSE_HOISTED} layer"] = layer_grad(dense_hoisted, dense_vars, x, cotangent)
        thunks["input projection"] = projection_grad(cell, x, args.hidden)
    if "step" in kinds:
        thunks[f"{DENSE_SCAN} step"] = train_step(dense_scan, dense_vars, x, target)
        thunks[f"{DENSE_HOISTED} step"] = train_step(dense_hoisted, dense_vars, x, target)
    if "products" in kinds:
        thunks["dense products"] = product_scan(cell, args.hidden, 1, args.batch, args.steps)
    apply_dense = jax.jit(dense_scan.apply)
    diffs = {}
    for modules in modules_list:
        ours = cells.RecurrentLayer(recurrent_modules=modules, weight_grad="hoisted", **common)
        ours_vars = {"params": variables["params"],
                     "masks": block_diagonal_masks(variables["masks"], modules)}
        y_dense, _ = apply_dense(ours_vars, x)
        y_ours, _ = jax.jit(ours.apply)(ours_vars, x)
        diffs[modules] = float(jnp.max(jnp.abs(y_dense - y_ours)))
        if "layer" in kinds:
            thunks[f"G={modules} layer"] = layer_grad(ours, ours_vars, x, cotangent)
        if "step" in kinds:
            thunks[f"G={modules} step"] = train_step(ours, ours_vars, x, target)
        if "products" in kinds:
            thunks[f"G={modules} products"] = product_scan(cell, args.hidden, modules,
                                                           args.batch, args.steps)
    times = median_times(thunks, args.repeats)
    if args.kernels:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from matmul import print_kernels  # noqa: PLC0415  (the benches' one trace parser)

        for key, thunk in thunks.items():
            if key.endswith("products") or key.startswith(("G=", DENSE_HOISTED)):
                print_kernels(f"{cell} {key}", thunk, args.steps)
    nan = float("nan")  # kinds not timed
    proj = times.get("input projection", nan)

    def row(variant: str, key: str, modules: int, products: str,
            max_diff: float | None) -> dict[str, Any]:
        return {"cell": cell, "variant": variant, "modules": modules,
                "layer_s": times.get(f"{key} layer", nan),
                "recurrent_s": times.get(f"{key} layer", nan) - proj,
                "products_s": times.get(products, nan), "step_s": times.get(f"{key} step", nan),
                "input_projection_s": proj, "max_abs_diff": max_diff}

    rows = [row(DENSE_SCAN, DENSE_SCAN, 1, "dense products", None),
            row(DENSE_HOISTED, DENSE_HOISTED, 1, "dense products", None)]
    rows += [row(f"G={g} modules, hoisted VJP", f"G={g}", g, f"G={g} products", diffs[g])
             for g in modules_list]
    for r in rows:
        for kind in ("layer", "recurrent", "step", "products"):
            r[f"{kind}_vs_dense_scan"] = rows[0][f"{kind}_s"] / r[f"{kind}_s"]
            r[f"{kind}_vs_dense_hoisted"] = rows[1][f"{kind}_s"] / r[f"{kind}_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="gru,lstm")
    parser.add_argument("--modules", default="1,2,4,8,16", help="the G to run")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="sequence length T")
    parser.add_argument("--unroll", type=int, default=1, help="lax.scan unroll (GPU: 8)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--timed", default="layer,products,step",
                        help="what to time: any of layer, products, step")
    parser.add_argument("--kernels", action="store_true",
                        help="print each variant's GPU kernels per step (profiler trace)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    args = parser.parse_args()
    if not args.timed or set(args.timed.split(",")) - {"layer", "products", "step"}:
        parser.error(f"--timed={args.timed!r}: give some of layer, products, step")

    device = jax.devices()[0]
    header = (
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}, python "
        f"{platform.python_version()}\nH={args.hidden} B={args.batch} T={args.steps} "
        f"D={args.hidden} unroll={args.unroll} repeats={args.repeats} float32, default "
        "matmul precision; ms are medians; ratio = that dense variant's time / this row's"
    )
    kinds = [k for k in ("layer", "recurrent", "products", "step")
             if k in args.timed.split(",") or (k == "recurrent" and "layer" in args.timed)]
    titles = {"layer": "layer fwd+bwd (ms) | ratio vs dense scan / vs dense hoisted",
              "recurrent": "recurrent (ms) | ratio vs dense scan / vs dense hoisted",
              "products": "products fwd (ms) | ratio vs dense",
              "step": "train step (ms) | ratio vs dense scan / vs dense hoisted"}
    lines = [header, "", f"| cell | variant | {' | '.join(titles[k] for k in kinds)} "
             "| max abs diff y |", "|---|---|" + "---|---|" * len(kinds) + "---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for cell in args.cells.split(","):
        for r in bench(cell, [int(g) for g in args.modules.split(",")], args):
            rows.append(r)
            cols = []
            for kind in kinds:
                cols.append(f"{r[f'{kind}_s'] * 1e3:.2f}")
                cols.append(f"{r[f'{kind}_vs_dense_hoisted']:.2f}" if kind == "products" else
                            f"{r[f'{kind}_vs_dense_scan']:.2f} / "
                            f"{r[f'{kind}_vs_dense_hoisted']:.2f}")
            diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
            lines.append(f"| {cell} | {r['variant']} | {' | '.join(cols)} | {diff} |")
            print(lines[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
