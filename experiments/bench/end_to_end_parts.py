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
import functools

import jax
import jax.numpy as jnp

from bsrnn import inference
from bsrnn.inference import speed
from bsrnn.kernels import recurrence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an exported one-layer GRU LM")
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    exported = inference.load(args.model)
    model, variables = inference.masked_dense(args.model)
    weights = exported.sampling_weights(1, args.length)
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
                h = recurrence._gates_xla(xp, jnp.zeros((x.shape[0], s.w_h.shape[1])), h,
                                          s.b_hn, hidden)
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
        "no_recurrent_product": jitted(partial_forward(False), weights),
        "no_layer": jitted(partial_forward(True), weights),
        "dense": jitted(dense_forward, variables),
        "exported_const": baked(inference.lm_forward, weights),
        "dense_const": baked(dense_forward, variables),
    }
    for name, seconds in speed.interleaved_medians(fns, args.repeats).items():
        print(f"{name:22s} {seconds / args.length * 1e6:6.2f} µs per character")


if __name__ == "__main__":
    main()
