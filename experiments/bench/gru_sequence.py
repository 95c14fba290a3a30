"""Whole RNN/GRU/LSTM sequences: block-sparse recurrence kernels vs dense JAX scan vs cuDNN.

Cases (`--cases cell:H,...`, default the issue-12 targets GRU 2560, GRU 1760, RNN 1760,
LSTM 1500), input width D = H (a layer of a stack), T = 256 steps, batch B in {1, 8, 32},
fp16 (`--dtype`); each recurrent gate kernel (H, H) with exactly 90% of its blocks pruned at
random (blocks 16x16, 32x32, 4x4), input kernels dense.

Methods, all on the same masked weights, in one process:

- `cudnn`: torch.nn.GRU / LSTM / RNN (cuDNN), fp16, batch_first, weights = the masked
  kernels (GPU only).
- `dense`: `bsrnn.cells.RecurrentLayer(cell, H, dtype=fp16, unroll=U)`: the masked dense
  kernels in `lax.scan` (cuBLAS per step).
- ours (`bsrnn.kernels.sparse_gru` / `sparse_lstm` / `sparse_rnn`): `auto` (the default
  impl: measured choice among dense, xla and the kernels; the record says which it chose),
  `xla` (lax.scan, bsc_matmul_xla per step), `pallas` (one fused Pallas step kernel per
  step in lax.scan(unroll=U), BSC panels; every cell); GRU only:
  `pallas_ell` / `pallas_hold` (the same with fixed-width panels / one-shot panel tiles),
  `persist` (one persistent kernel for all steps, weight panels held in registers),
  `persist_l2` (persistent, panels re-read from L2 every step); `mosaic` (the Mosaic GPU
  step kernel, one launch per step) and `mosaic_p` / `mosaic_p_s10` (the Mosaic GPU
  persistent kernel, one launch, weights resident in shared memory; 6 / 10 ring stages;
  `mosaic_p_nolimit`: its waits without a spin limit, one thread spinning).

Timing: each method runs whole sequences back to back (`--calls` calls, inputs rotating
over 3 random sets, no host sync in between); µs per step = (elapsed / calls) / T, median
over `--rounds` rounds. JAX: host clock around the calls with one block_until_ready at the
end; torch: CUDA events around the calls. So every number includes the input projection of
all steps and any gaps between launches, i.e. what a user waits for. `proj` is the hoisted
input projection alone (one einsum), so recurrence-only ≈ method − proj. With --profile,
JAX methods also get the summed GPU kernel time and the kernel launches per step (profiler
trace; shows extra copies or per-step kernels that should not be there).

Checks: each method's output on a fresh input is compared with an fp32 HIGHEST-precision
`RecurrentLayer` on the same weights (relative L2 error over the whole (B, T, H) output); the
persistent kernel's barrier counter is checked (every barrier completed, none gave up).

    XLA_PYTHON_CLIENT_PREALLOCATE=false BSRNN_AUTOTUNE_CACHE=$OUT/autotune.json PYTHONPATH=. \
        python3 experiments/bench/gru_sequence.py --skip_canary --budget_s 220 \
        --json=$OUT/gru_sequence.json --markdown=$OUT/gru_sequence.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

METHODS = {  # label: (impl, kernel options, unroll)
    "auto": ("auto", {}, 16),
    "xla": ("xla", {}, 16),
    "mosaic": ("mosaic", {}, 1),
    "mosaic_p": ("mosaic_persistent", {}, 1),  # one launch, weights resident in SMEM
    "mosaic_p_s10": ("mosaic_persistent", {"stages": 10}, 1),
    "mosaic_p_nolimit": ("mosaic_persistent", {"spin_limit": None}, 1),  # unchecked waits
    "pallas": ("pallas", {}, 16),
    "pallas_ell": ("pallas", {"layout": "ell"}, 16),
    "pallas_hold": ("pallas", {"layout": "ell", "hold": True}, 16),
    "pallas_u64": ("pallas", {}, 64),
    "persist": ("persistent", {}, 1),
    "persist_l2": ("persistent", {"hold": False}, 1),
    "persist_bsc": ("persistent", {"hold": False, "layout": "bsc"}, 1),
    "persist_w4": ("persistent", {"num_warps": 4}, 1),
    "persist_fma": ("persistent", {"compute": "fma"}, 1),  # B <= 8 only
    "pallas_interp": ("pallas_interpret", {}, 4),  # CPU smoke tests of this script
}


GATES = {"gru": "rzn", "lstm": "ifgo", "rnn": "h"}
# The methods every cell has (the step kernel's "bsc" layout included); the others are GRU
# kernels (persistent, mosaic) or need the "ell" panels that only GRU weights carry.
ANY_CELL = ("auto", "xla", "pallas", "pallas_u64", "pallas_interp")


def block_masks(rng, hidden, block_shape, sparsity, n_gates=3):
    """(H, H) gate masks, each keeping exactly round((1 - s)·blocks) random blocks."""
    bh, bw = block_shape
    grid = (-(-hidden // bh), -(-hidden // bw))
    out = []
    for _ in range(n_gates):
        keep = np.zeros(grid[0] * grid[1], bool)
        keep[rng.permutation(keep.size)[: round((1 - sparsity) * keep.size)]] = True
        out.append(np.kron(keep.reshape(grid), np.ones(block_shape, bool))[:hidden, :hidden])
    return out


def layer_variables(rng, hidden, in_features, masks, cell="gru"):
    """RecurrentLayer-shaped params (random, kernels ~ 1/sqrt(fan_in)) and masks."""
    params, mask_tree = {}, {}
    for g, m in zip(GATES[cell], masks, strict=True):
        params[f"input_{g}"] = {
            "kernel": (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features))
            .astype(np.float32),
            "bias": (0.1 * rng.standard_normal(hidden)).astype(np.float32)}
        params[f"recurrent_{g}"] = {
            # scaled up by 1/sqrt(density) so that h keeps moving with 90% of blocks pruned
            "kernel": (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden * m.mean()))
            .astype(np.float32),
            "bias": (0.1 * rng.standard_normal(hidden)).astype(np.float32)}
        mask_tree[f"input_{g}"] = {"kernel": np.ones((in_features, hidden), bool)}
        mask_tree[f"recurrent_{g}"] = {"kernel": m}
    return params, mask_tree


def rel_err(y, ref):
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.isfinite(y).all():
        return float("inf")
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


class Bench:
    def __init__(self, args):
        self.args = args
        self.records = []
        self.meta = {}
        self.t0 = time.perf_counter()

    def out_of_time(self):
        return time.perf_counter() - self.t0 > self.args.budget_s

    def add(self, **rec):
        self.records.append(rec)
        us = rec.get("us_step")
        extra = ""
        if rec.get("kernel_us_step") is not None:
            extra = (f" kernel {rec['kernel_us_step']:.2f} us/step, "
                     f"{rec['kernels_per_step']:.2f} launches/step")
        print(f"  H={rec['hidden']} B={rec['batch']:<3d} {rec['block']:6s} "
              f"{rec['method']:12s} " + (
                  f"{us:8.2f} us/step err {rec.get('err') or float('nan'):.1e} "
                  f"(compile+check {rec.get('setup_s', 0):.1f}s){extra}"
                  if us is not None else f"-- {rec.get('error', '')}"), flush=True)
        self.save()

    def save(self):
        """Writes the JSON and the tables after every record, so a run stopped from outside
        (a command's time limit) still leaves what it measured."""
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump({"meta": self.meta, "records": self.records}, f, indent=1)
        if self.args.markdown:
            with open(self.args.markdown, "w") as f:
                f.write(markdown(self))


def time_jax(fn, inputs, calls, rounds):
    import jax

    jax.block_until_ready(fn(*inputs[0]))
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = None
        for i in range(calls):
            out = fn(*inputs[i % len(inputs)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t) / calls)
    return statistics.median(per_call)


def time_torch(fn, inputs, calls, rounds):
    import torch

    fn(*inputs[0])
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
        e.record()
        e.synchronize()
        per_call.append(s.elapsed_time(e) * 1e-3 / calls)
    return statistics.median(per_call)


def profile(jobs, steps, calls=3):
    """{label: (kernel µs per step, launches per step)} from one profiler trace."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from matmul import profile_jax  # noqa: PLC0415  (same trace parsing as the matmul bench)

    res = profile_jax({k: (fn, args, 1) for k, (fn, args) in jobs.items()}, calls)
    return {k: (us / steps, n / steps) for k, (us, n) in res.items()}


def named_jit(fn, label):
    import jax

    fn.__name__ = f"run_{label}__"  # module jit_run_<label>, found by the profile parser
    return jax.jit(fn)


def carry_of(cell, h):
    """The initial carry of ``cell`` from one (B, H) array: (h, h) for the LSTM."""
    return (h, h) if cell == "lstm" else h


def run_case(bench, cell, hidden, block, batch, params, masks, weights, xs_np, h0_np,
             baselines):
    """Times the methods of one (cell, H, block, B) case; baselines also when `baselines`."""
    import jax
    import jax.numpy as jnp

    from bsrnn import kernels
    from bsrnn.cells import RecurrentLayer
    a = bench.args
    steps = a.steps
    f16 = jnp.dtype(a.dtype)
    sequence = {"gru": kernels.sparse_gru, "lstm": kernels.sparse_lstm,
                "rnn": kernels.sparse_rnn}[cell]
    xs = [(jnp.asarray(x, f16), jnp.asarray(h0_np, f16)) for x in xs_np[1:]]
    x_check, h0 = jnp.asarray(xs_np[0], f16), jnp.asarray(h0_np, f16)
    variables = {"params": params, "masks": masks}
    with jax.default_matmul_precision("highest"):
        ref, _ = jax.jit(lambda x, h: RecurrentLayer(cell, hidden).apply(
            variables, x.astype(jnp.float32),
            initial_carry=carry_of(cell, h.astype(jnp.float32))))(
                x_check, h0)
    ref = np.asarray(ref)
    base = dict(cell=cell, hidden=hidden, block=block, batch=batch, steps=steps,
                dtype=f16.name)
    jobs = {}
    wd = jax.tree.map(jnp.asarray, weights)

    def jax_method(label, fn, check=True, **extra):
        rec = dict(base, method=label, **extra)
        if bench.out_of_time():
            bench.add(**rec, us_step=None, error="skipped: out of time budget")
            return
        t = time.perf_counter()
        try:
            fn = named_jit(fn, label)
            err = rel_err(fn(x_check, h0), ref) if check else None
            setup = time.perf_counter() - t
            us = time_jax(fn, xs, a.calls, a.rounds) * 1e6 / steps
            jobs[label] = (fn, xs[0])
            if label == "auto":  # which implementation "auto" measured as the fastest
                rec["chose"] = kernels.resolve_impl(wd, batch, steps, f16)
            bench.add(**rec, us_step=us, err=err, setup_s=setup)
        except Exception as e:  # noqa: BLE001  (record and carry on: one run, many methods)
            bench.add(**rec, us_step=None, error=f"{type(e).__name__}: {str(e)[:400]}")

    if baselines:
        if "proj" in a.methods:
            jax_method("proj", lambda x, h: kernels.input_projection(x, wd), check=False)
        if "dense" in a.methods:
            layer = RecurrentLayer(cell, hidden, dtype=f16, unroll=a.unroll)
            jax_method("dense", lambda x, h: layer.apply(
                variables, x, initial_carry=carry_of(cell, h))[0])
        if "cudnn" in a.methods:
            torch_cudnn(bench, base, params, masks, xs_np, h0_np, ref)
    for label in a.methods:
        if label not in METHODS or (cell != "gru" and label not in ANY_CELL):
            continue
        impl, options, unroll = METHODS[label]
        if label == "xla" and (batch * hidden * steps > a.xla_max_work or
                               (a.xla_first_block_only and not baselines)):
            continue
        if options.get("compute") == "fma" and batch > 8:
            continue
        if impl == "persistent" and not bench.meta.get("persistent_ok", False):
            bench.add(**base, method=label, us_step=None, error="skipped: canary failed")
            continue
        # (a persistent kernel whose barrier gave up raises: recorded as an error)
        jax_method(label, lambda x, h, i=impl, o=options, u=unroll: sequence(
            x, wd, carry_of(cell, h), impl=i, unroll=u, **o)[0])
    if a.profile and jobs:
        try:
            for label, (us, launches) in profile(jobs, steps).items():
                for rec in reversed(bench.records):
                    if rec["method"] == label and rec["batch"] == batch and \
                            rec["block"] == block and rec["hidden"] == hidden:
                        rec.update(kernel_us_step=us, kernels_per_step=launches)
                        break
                print(f"    profile {label}: kernels {us:.2f} us/step, "
                      f"{launches:.2f} launches/step", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"    profile failed: {type(e).__name__}: {e}", flush=True)
        bench.save()


def torch_cudnn(bench, base, params, masks, xs_np, h0_np, ref):
    import torch

    a = bench.args
    rec = dict(base, method="cudnn")
    if bench.out_of_time():
        bench.add(**rec, us_step=None, error="skipped: out of time budget")
        return
    try:
        t = time.perf_counter()
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device for torch")
        cell, hidden, in_features = base["cell"], base["hidden"], xs_np[0].shape[-1]
        gates = GATES[cell]
        module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM,
                  "rnn": functools.partial(torch.nn.RNN, nonlinearity="tanh")}[cell]
        gru = module(in_features, hidden, batch_first=True)

        def cat(kind, part):
            return np.concatenate([np.where(masks[f"{kind}_{g}"]["kernel"],
                                            params[f"{kind}_{g}"]["kernel"], 0)
                                   if part == "kernel" else params[f"{kind}_{g}"]["bias"]
                                   for g in gates], axis=-1)

        with torch.no_grad():
            gru.weight_ih_l0.copy_(torch.tensor(cat("input", "kernel").T))
            gru.weight_hh_l0.copy_(torch.tensor(cat("recurrent", "kernel").T))
            gru.bias_ih_l0.copy_(torch.tensor(cat("input", "bias")))
            gru.bias_hh_l0.copy_(torch.tensor(cat("recurrent", "bias")))
        gru = gru.cuda().half().eval()
        dev = dict(device="cuda", dtype=torch.float16)
        xs = [(torch.tensor(x, **dev), torch.tensor(h0_np, **dev)[None]) for x in xs_np]

        def fn(x, h):
            with torch.no_grad():
                return gru(x, (h, h) if cell == "lstm" else h)[0]

        err = rel_err(fn(*xs[0]).float().cpu().numpy(), ref)
        setup = time.perf_counter() - t
        us = time_torch(fn, xs[1:], a.calls, a.rounds) * 1e6 / base["steps"]
        bench.add(**rec, us_step=us, err=err, setup_s=setup,
                  cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001
        bench.add(**rec, us_step=None, error=f"{type(e).__name__}: {str(e)[:400]}")


def canary(args):
    """A tiny persistent run, in its own process, so a kernel that hangs cannot take the
    benchmark with it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_canary"]
    try:
        p = subprocess.run(cmd, timeout=args.canary_timeout_s, capture_output=True, text=True)
        ok = p.returncode == 0 and "CANARY OK" in p.stdout
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {args.canary_timeout_s}s"
    print(f"persistent canary: {'ok' if ok else 'FAILED'}\n{tail if not ok else ''}",
          flush=True)
    return ok


def _canary_main():
    import jax
    import jax.numpy as jnp

    from bsrnn import kernels
    from bsrnn.cells import RecurrentLayer

    rng = np.random.default_rng(0)
    hidden, batch, steps = 256, 8, 16
    params, masks = layer_variables(rng, hidden, 32, block_masks(rng, hidden, (16, 16), 0.9))
    w = kernels.sparse_gru_weights(params, masks, (16, 16), dtype=jnp.float16)
    x = rng.standard_normal((batch, steps, 32)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ref, _ = RecurrentLayer("gru", hidden).apply({"params": params, "masks": masks}, x)
    for opts in ({}, {"hold": False}):
        out, _ = jax.jit(lambda x, o=opts: kernels.sparse_gru(
            x, w, impl="persistent", **o))(jnp.asarray(x, jnp.float16))
        err = rel_err(out, ref)
        print(f"persistent {opts}: err {err:.2e}", flush=True)
        if not err < 1e-2:
            sys.exit(1)
    print("CANARY OK", flush=True)


def markdown(bench):
    recs = [r for r in bench.records if r.get("steps")]
    lines = []
    for name, hidden in dict.fromkeys((r["cell"], r["hidden"]) for r in recs):
        sub = [r for r in recs if r["hidden"] == hidden and r["cell"] == name]
        base = {(r["batch"], r["method"]): r for r in sub if r["method"] in
                ("cudnn", "dense", "proj")}
        ours = [m for m in bench.args.methods if m in METHODS and any(
            r["method"] == m for r in sub)]
        vs = "cuDNN" if any(r["method"] == "cudnn" and r.get("us_step") for r in sub) \
            else "dense JAX"
        lines += [f"**{name.upper()} {hidden}, T = {bench.args.steps}, {bench.args.dtype}, "
                  f"{bench.args.sparsity:.0%} block-sparse recurrent weights**: µs per step, "
                  f"whole sequence incl. the input projection (× = {vs} time / this; auto: "
                  "the impl it chose)", ""]
        head = ["B", "block", "cuDNN", "dense JAX", "proj"] + ours
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cell(r, ref=None):
            if r is None:
                return ""
            if r.get("us_step") is None:
                return "error" if not str(r.get("error", "")).startswith("skipped") else "–"
            s = f"{r['us_step']:.2f}"
            if ref and ref.get("us_step"):
                s += f" ({ref['us_step'] / r['us_step']:.1f}×)"
            return s + (f" {r['chose']}" if r.get("chose") else "")

        for block in dict.fromkeys(r["block"] for r in sub):
            for batch in sorted({r["batch"] for r in sub}):
                by = {r["method"]: r for r in sub if r["batch"] == batch and r["block"] == block}
                if not any(m in by for m in ours):
                    continue
                cud = base.get((batch, "cudnn"))
                ref = cud if vs == "cuDNN" else base.get((batch, "dense"))
                row = [str(batch), block, cell(cud), cell(base.get((batch, "dense")), ref),
                       cell(base.get((batch, "proj")))]
                row += [cell(by.get(m), ref) for m in ours]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        prof = [r for r in sub if r.get("kernels_per_step") is not None]
        if prof:
            lines += [f"{name.upper()} {hidden}: GPU kernel time per step (profiler) / "
                      "launches per step",
                      "", "| B | block | method | kernel µs/step | launches/step | err |",
                      "|---|---|---|---|---|---|"]
            for r in prof:
                lines.append(f"| {r['batch']} | {r['block']} | {r['method']} | "
                             f"{r['kernel_us_step']:.2f} | {r['kernels_per_step']:.2f} | "
                             f"{r['err'] if r.get('err') is None else format(r['err'], '.1e')} |")
            lines.append("")
    return "\n".join(lines)


def main():
    if "--_canary" in sys.argv:
        _canary_main()
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="gru:2560,gru:1760,rnn:1760,lstm:1500",
                   help="cell:H pairs; cells gru, lstm, rnn (tanh)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--blocks", default="16x16,32x32,4x4")
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--methods", default="cudnn,dense,proj,auto,xla,pallas,persist,mosaic")
    p.add_argument("--unroll", type=int, default=16, help="dense JAX scan unroll")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--xla_max_work", type=float, default=1e12,
                   help="skip the xla path above this B·H·T")
    p.add_argument("--xla_first_block_only", action="store_true",
                   help="time the xla path only with the first block shape (compile time)")
    p.add_argument("--skip_canary", action="store_true",
                   help="no persistent canary subprocess (the barrier check still runs)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--budget_s", type=float, default=220,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--canary_timeout_s", type=float, default=120)
    p.add_argument("--commit", default="")
    p.add_argument("--json", default="")
    p.add_argument("--markdown", default="")
    args = p.parse_args()
    args.methods = args.methods.split(",")
    bench = Bench(args)
    persistent_ok = any(METHODS.get(m, ("",))[0] == "persistent" for m in args.methods) and \
        (args.skip_canary or canary(args))

    import jax
    import jax.numpy as jnp

    from bsrnn import kernels

    bench.meta.update(
        date=time.strftime("%Y-%m-%d"), commit=args.commit, argv=sys.argv,
        python=platform.python_version(), jax=jax.__version__,
        device=str(jax.devices()[0]), persistent_ok=persistent_ok,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    try:
        import torch

        bench.meta.update(torch=torch.__version__, cuda=torch.version.cuda,
                          cudnn=torch.backends.cudnn.version(),
                          gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    except Exception as e:  # noqa: BLE001
        bench.meta["torch"] = f"unavailable: {e}"
    print(json.dumps(bench.meta), flush=True)
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    builders = {"gru": kernels.sparse_gru_weights, "lstm": kernels.sparse_lstm_weights,
                "rnn": kernels.sparse_rnn_weights}
    blocks = args.blocks.split(",")
    for i, block in enumerate(blocks):  # block shapes outermost: the later ones are extras
        for cell, hidden in cases:
            rng = np.random.default_rng([hidden, i, len(GATES[cell])])
            block_shape = tuple(int(s) for s in block.split("x"))
            if bench.out_of_time():
                print(f"{cell} H={hidden} {block}: skipped, out of time budget", flush=True)
                continue
            params, masks = layer_variables(
                rng, hidden, hidden,
                block_masks(rng, hidden, block_shape, args.sparsity, len(GATES[cell])), cell)
            t = time.perf_counter()
            weights = builders[cell](params, masks, block_shape, dtype=jnp.dtype(args.dtype))
            print(f"{cell} H={hidden} {block}: {weights.w_h.nnzb} blocks "
                  f"({weights.w_h.values.nbytes / 1e6:.2f} MB), built in "
                  f"{time.perf_counter() - t:.1f}s", flush=True)
            for batch in batches:
                xs_np = [rng.standard_normal((batch, args.steps, hidden)).astype(np.float32)
                         for _ in range(4)]
                h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
                run_case(bench, cell, hidden, block, batch, params, masks, weights, xs_np,
                         h0, baselines=(i == 0))
    md = markdown(bench)
    print("\n" + md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(f"total {time.perf_counter() - bench.t0:.0f}s")


if __name__ == "__main__":
    main()
