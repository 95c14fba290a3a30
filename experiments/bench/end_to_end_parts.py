"""Where LM sampling time goes: the exported model's sampling loop with parts removed.

Diagnostic for `end_to_end.py`'s sampling row (WORKSPACE.md, "End to end"). Every variant is
the same `lax.scan` over N characters at batch 1 with Gumbel-max sampling, the weights passed
as arguments, timed interleaved (medians), µs per character:

- `exported`: `bsrnn.inference.sample_tokens(lm_forward)` on the exported model;
- `no_recurrent_product`: its GRU step with the block-sparse h @ W_h replaced by zeros
  (input projection, gate math, softmax and sampling left);
- `no_layer`: no GRU layer at all (embedding, softmax, sampling, loop);
- `dense`: the masked dense Flax model in the same loop;
- `*_const`: the exported and dense loops with their weights compiled in as constants.

    PYTHONPATH=. python3 experiments/bench/end_to_end_parts.py --model=/tmp/w/model.npz
"""

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn import inference
from bsrnn.kernels import recurrence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported one-layer GRU LM")
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--impl", default="", help="force the recurrent layer's impl")
    args = parser.parse_args()
    exported = inference.load(args.model)
    model, variables = inference.masked_dense(args.model)
    weights = exported.sampling_weights(1, args.length)
    if args.impl:
        weights = dataclasses.replace(weights, layers=tuple(
            dataclasses.replace(layer, impl=args.impl) for layer in weights.layers))
    print("recurrent impl", [layer.impl for layer in weights.layers],
          "softmax impl", getattr(weights.output, "impl", None),
          "input table", weights.input_table is not None)
    unfolded = dataclasses.replace(weights, input_table=None)
    # The recurrent kernel without `with_xla_layout`'s precomputed arrays (as before it).
    plain = dataclasses.replace(weights, layers=tuple(dataclasses.replace(
        layer, sparse=dataclasses.replace(layer.sparse, w_h=dataclasses.replace(
            layer.sparse.w_h, col_ids=None, values_t=None))) for layer in weights.layers))
    layer = weights.layers[0].sparse
    if len(weights.layers) != 1 or layer is None or exported.cell != "gru":
        raise SystemExit("--model must be a one-layer GRU LM stored block-sparse")
    hidden = layer.hidden

    def partial_forward(skip_layer):
        def forward(w, tokens, carry):
            x = jnp.take(w.embedding, tokens[:, -1], axis=0)
            h = jnp.zeros((x.shape[0], hidden)) if carry is None else carry[0]
            if skip_layer:
                h = h + x[:, :1]
            else:
                s = w.layers[0].sparse
                xp = x @ s.w_i + s.b_i
                h = recurrence._cell_update(s, xp, jnp.zeros((x.shape[0], s.w_h.shape[1])), h)
            return inference.linear(w.output, h)[:, None], (h,)
        return forward

    prompt = jnp.asarray(exported.encode("\n"), jnp.int32)[None]
    noise = jax.random.gumbel(jax.random.key(0), (args.length, 1, len(exported.vocab)))

    def jitted(forward, w):
        fn = jax.jit(functools.partial(inference.sample_tokens, forward),
                     static_argnames="temperature")
        return functools.partial(fn, w, prompt, None, noise, temperature=0.8)

    def baked(forward, w):
        fn = jax.jit(lambda p, n: inference.sample_tokens(forward, w, p, None, n, 0.8))
        return functools.partial(fn, prompt, noise)

    dense_forward = lambda v, t, c: model.apply(v, t, c)  # noqa: E731
    fns = {
        "exported": jitted(inference.lm_forward, weights),
        "unfolded": jitted(inference.lm_forward, unfolded),
        "plain_layout": jitted(inference.lm_forward, plain),
        "unfolded_plain_layout": jitted(inference.lm_forward,
                                        dataclasses.replace(plain, input_table=None)),
        "no_recurrent_product": jitted(partial_forward(False), weights),
        "no_layer": jitted(partial_forward(True), weights),
        "dense": jitted(dense_forward, variables),
        "exported_const": baked(inference.lm_forward, weights),
        "dense_const": baked(dense_forward, variables),
    }
    wall, cpu = _interleaved(fns, args.repeats)
    print(f"µs per character: median wall clock, min CPU time of the process ({args.repeats} "
          "calls each, interleaved)")
    for name in fns:
        print(f"{name:22s} {np.median(wall[name]) / args.length * 1e6:6.2f}   "
              f"{min(cpu[name]) / args.length * 1e6:6.2f}")


def _interleaved(fns, repeats):
    """Wall and process CPU seconds of every call (a loaded machine inflates the wall
    clock; the CPU time of this process is less affected)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    wall, cpu = ({name: [] for name in fns} for _ in range(2))
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


if __name__ == "__main__":
    main()
