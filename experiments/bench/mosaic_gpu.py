"""Whole GRU sequences: the Mosaic GPU recurrence kernel against the Triton kernels, the dense
fp16 scan and cuDNN, on one Hopper GPU.

Sizes: GRU H in --hidden (2560, 1760), D = H, T = --steps (256), batch in --batch (1, 8, 32),
fp16, each recurrent gate kernel with exactly 90% of its --block blocks pruned at random (the
masks and params of `gru_sequence.py`), input kernels dense.

Methods, on the same masked weights, in one process:
- `mosaic`: `bsrnn.kernels.mosaic_gpu.gru_recurrence_mosaic` after the hoisted input
  projection (one Mosaic GPU kernel per step in lax.scan(unroll=16)); `mosaic_cK_sS` the same
  with chunk K and S ring stages (--variants);
- `pallas`, `persistent`: `kernels.sparse_gru(impl=...)` (the Triton kernels);
- `dense`: `RecurrentLayer("gru", H, dtype=fp16, unroll=16)` (cuBLAS per step);
- `cudnn`: torch.nn.GRU in fp16.

Timing: whole sequences, --calls calls back to back (inputs rotating over 3 random sets) per
round, wall clock (JAX: host clock and one block_until_ready; torch: CUDA events), the
methods interleaved round by round, median over --rounds rounds; µs per step = time per
sequence / T, input projection included. Ratios: baseline time / mosaic time.
Checks: every method's output on a fresh input against an fp32 HIGHEST-precision
`RecurrentLayer` (relative L2 error over the whole output).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 experiments/bench/mosaic_gpu.py \
        --json $OUT/mosaic_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gru_sequence import block_masks, layer_variables, rel_err  # noqa: E402


def _jax_methods(args, hidden, batch, variables, weights):
    """{label: jitted fn(x, h0) -> (B, T, H)} of the JAX methods."""
    import jax
    import jax.numpy as jnp

    from bsrnn import kernels
    from bsrnn.cells import RecurrentLayer
    from bsrnn.kernels import mosaic_gpu

    wd = jax.tree.map(jnp.asarray, weights)
    fns = {}
    for v in args.variants.split(","):
        chunk, stages = (int(p[1:]) for p in v.split("_"))
        label = "mosaic" if v == args.variants.split(",")[0] else f"mosaic_{v}"  # first: ratios
        if (reason := mosaic_gpu.unsupported(weights, batch, chunk=chunk, stages=stages)):
            print(f"  {label}: unsupported: {reason}", flush=True)
            continue

        def run(x, h0, c=chunk, s=stages):
            xp = kernels.gru_input_projection(x, wd)
            out = mosaic_gpu.gru_recurrence_mosaic(xp, weights, h0, chunk=c, stages=s)
            return jnp.swapaxes(out, 0, 1)

        fns[label] = run
    if "pallas" in args.methods:
        fns["pallas"] = lambda x, h: kernels.sparse_gru(x, wd, h, impl="pallas")[0]
    if "persistent" in args.methods:
        fns["persistent"] = lambda x, h: kernels.sparse_gru(x, wd, h, impl="persistent",
                                                            unroll=1)[0]
    if "dense" in args.methods:
        layer = RecurrentLayer("gru", hidden, dtype=jnp.float16, unroll=16)
        fns["dense"] = lambda x, h: layer.apply(variables, x, initial_carry=h)[0]
    return {k: jax.jit(f) for k, f in fns.items()}


def _cudnn(params, masks, hidden, in_features):
    import torch

    gru = torch.nn.GRU(in_features, hidden, batch_first=True)

    def cat(kind, part):
        return np.concatenate([np.where(masks[f"{kind}_{g}"]["kernel"],
                                        params[f"{kind}_{g}"]["kernel"], 0)
                               if part == "kernel" else params[f"{kind}_{g}"]["bias"]
                               for g in "rzn"], axis=-1)

    with torch.no_grad():
        gru.weight_ih_l0.copy_(torch.tensor(cat("input", "kernel").T))
        gru.weight_hh_l0.copy_(torch.tensor(cat("recurrent", "kernel").T))
        gru.bias_ih_l0.copy_(torch.tensor(cat("input", "bias")))
        gru.bias_hh_l0.copy_(torch.tensor(cat("recurrent", "bias")))
    gru = gru.cuda().half().eval()

    def fn(x, h):
        with torch.no_grad():
            return gru(x, h[None])[0]

    return fn


def run_case(args, hidden, block, batch, records):
    import jax
    import jax.numpy as jnp
    import torch

    from bsrnn import kernels
    from bsrnn.cells import RecurrentLayer

    rng = np.random.default_rng(hidden * 1000 + batch)
    masks = block_masks(rng, hidden, block, 0.9)
    params, mask_tree = layer_variables(rng, hidden, hidden, masks)
    variables = {"params": params, "masks": mask_tree}
    weights = kernels.sparse_gru_weights(params, mask_tree, block, dtype=jnp.float16)
    xs_np = [rng.standard_normal((batch, args.steps, hidden)).astype(np.float32)
             for _ in range(4)]
    h0_np = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(lambda x, h: RecurrentLayer("gru", hidden).apply(
            variables, x, initial_carry=h))(jnp.asarray(xs_np[0]), jnp.asarray(h0_np))[0])
    f16 = jnp.float16
    jx = [(jnp.asarray(x, f16), jnp.asarray(h0_np, f16)) for x in xs_np]
    dev = dict(device="cuda", dtype=torch.float16)
    tx = [(torch.tensor(x, **dev), torch.tensor(h0_np, **dev)) for x in xs_np]
    timers, base = {}, dict(hidden=hidden, block=f"{block[0]}x{block[1]}", batch=batch,
                            steps=args.steps)
    methods = _jax_methods(args, hidden, batch, variables, weights)
    if "cudnn" in args.methods:
        methods["cudnn"] = _cudnn(params, mask_tree, hidden, hidden)
    for label, fn in methods.items():
        inputs = tx if label == "cudnn" else jx
        t = time.perf_counter()
        try:
            out = fn(*inputs[0])
            out = out.float().cpu().numpy() if label == "cudnn" else np.asarray(out, np.float32)
            err = rel_err(out, ref)
            timers[label] = (fn, inputs[1:])
            records.append(dict(base, method=label, err=err,
                                setup_s=time.perf_counter() - t, times=[]))
            print(f"  {label:16s} err {err:.1e} setup {time.perf_counter() - t:.1f}s",
                  flush=True)
        except Exception as e:  # noqa: BLE001  (record and carry on: one run, many methods)
            records.append(dict(base, method=label, error=f"{type(e).__name__}: {e}"[:2000],
                                traceback=traceback.format_exc()))
            print(f"  {label:16s} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
            if not any(r.get("traceback") for r in records[:-1]):  # the first one in full
                print(traceback.format_exc()[-6000:], flush=True)
    recs = {r["method"]: r for r in records[-len(methods):] if "times" in r}
    for label, (fn, inputs) in timers.items():  # warm-up
        jax.block_until_ready(fn(*inputs[0])) if label != "cudnn" else fn(*inputs[0])
    torch.cuda.synchronize()
    for _ in range(args.rounds):  # interleaved rounds
        for label, (fn, inputs) in timers.items():
            if label == "cudnn":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for i in range(args.calls):
                    fn(*inputs[i % len(inputs)])
                e.record()
                e.synchronize()
                dt = s.elapsed_time(e) * 1e-3
            else:
                t = time.perf_counter()
                out = None
                for i in range(args.calls):
                    out = fn(*inputs[i % len(inputs)])
                jax.block_until_ready(out)
                dt = time.perf_counter() - t
            recs[label]["times"].append(dt / args.calls / args.steps * 1e6)
    for r in recs.values():
        r["us_step"] = statistics.median(r["times"])
    mos = recs.get("mosaic", {}).get("us_step")
    for label, r in recs.items():
        ratio = f"{r['us_step'] / mos:5.2f}x" if mos else "  -  "
        print(f"  H={hidden} B={batch:<3d} {label:16s} {r['us_step']:8.2f} us/step "
              f"(baseline/mosaic {ratio}) err {r['err']:.1e}", flush=True)


def table(records):
    rows = ["| H | block | B | method | us/step | vs mosaic | err |",
            "|---|---|---|---|---|---|---|"]
    mos = {(r["hidden"], r["block"], r["batch"]): r.get("us_step") for r in records
           if r["method"] == "mosaic"}
    for r in records:
        m = mos.get((r["hidden"], r["block"], r["batch"]))
        us = r.get("us_step")
        rows.append(f"| {r['hidden']} | {r['block']} | {r['batch']} | {r['method']} | "
                    + (f"{us:.2f} | {us / m:.2f}x | {r['err']:.1e} |" if us and m else
                       f"{us or '-'} | - | {r.get('err', r.get('error', '-'))} |"))
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", default="2560,1760")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--block", default="16x16")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--methods", default="pallas,persistent,dense,cudnn")
    p.add_argument("--variants", default="c4_s6,c8_s4,c16_s2",
                   help="mosaic chunk/stages variants, cK_sS, the first is 'mosaic'")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget_s", type=float, default=240)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import jax
    import torch

    meta = dict(jax=jax.__version__, torch=torch.__version__, device=str(jax.devices()[0]),
                kind=jax.devices()[0].device_kind, cudnn=torch.backends.cudnn.version())
    print(meta, flush=True)
    records, t0 = [], time.perf_counter()
    block = tuple(int(b) for b in args.block.split("x"))
    for hidden in (int(h) for h in args.hidden.split(",")):
        for batch in (int(b) for b in args.batch.split(",")):
            if time.perf_counter() - t0 > args.budget_s:
                print(f"skipped H={hidden} B={batch}: out of time budget", flush=True)
                continue
            print(f"H={hidden} B={batch} block {args.block}", flush=True)
            run_case(args, hidden, block, batch, records)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "records": records}, f, indent=1)
    print(table(records))


if __name__ == "__main__":
    main()
