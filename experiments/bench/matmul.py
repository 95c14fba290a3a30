"""Block-sparse y = x @ K against dense and library sparse products (SPEC §2.6 baselines).

Paper sizes: RNN 1760 (K 1760x1760, 90% block sparsity) and GRU 2560 (K 2560x7680, i.e.
the three gates' W of 7680x2560, 95% block sparsity); x of N rows, N in {1, 8, 32, 128}.
Methods, each on the same masked weights and fresh random inputs, in one process:

- jax: `dense` (jnp.dot on K * mask: cuBLAS), `auto` (`bsrnn.kernels.bsc_matmul`'s default:
  the fastest of dense, xla and pallas measured once per size; the table names its choice),
  `xla` (bsrnn.kernels.bsc_matmul_xla; in
  CPU mode also `xla_dot` and `xla_fma`, its two product forms, beside its own choice, and
  `xla_layout`, the XLA path on the matrix with `bsc.with_xla_layout`'s precomputed arrays),
  `pallas` (bsrnn.kernels.bsc_matmul_pallas), `bcsr` (jax.experimental.sparse.BCSR,
  element-sparse, timed for 4x4 masks only: its cost does not depend on the block shape).
- torch (GPU mode): `t_dense` (torch.mm, cuBLAS), `t_csr` (cuSPARSE CSR SpMM), `t_bsr`
  (torch BSR: Triton for fp16 and blocks >= 16, else what torch dispatches to), all as
  W (out, in) @ X (in, N).

Timing is device work: JAX ops run R times inside one jitted call (each on its own input,
chained through `lax.optimization_barrier` so XLA neither merges nor reorders them). On
the GPU the per-op time is the summed duration of the GPU kernels of those calls (from a
`jax.profiler` trace, over calls * R: launch gaps and host time are not counted); on the
CPU it is the call's wall time over R, median over calls, the methods' calls interleaved.
Torch ops are captured R at a time in a CUDA graph and timed with CUDA events around
replays (so their times include the graph's small launch gaps).
Ratios are dense time over method time (> 1: faster than dense), against jnp.dot for jax
methods and torch.mm for torch methods, from the same run. Each method's output is first
checked against an fp32 (HIGHEST precision) dense product on a fresh input.

    PYTHONPATH=. python experiments/bench/matmul.py --mode=gpu --tune --json=matmul_gpu.json
    PYTHONPATH=. python experiments/bench/matmul.py --mode=cpu --json=matmul_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn.kernels import bsc_matmul, bsc_matmul_pallas, bsc_matmul_xla, matmul_impl
from bsrnn.kernels.bsc import BlockSparseMatrix, from_dense, with_xla_layout

MATRICES = {  # name: (in_features, out_features, block sparsity)
    "rnn1760": (1760, 1760, 0.90),
    "gru2560": (2560, 7680, 0.95),
}


def block_mask(rng, shape, block_shape, sparsity):
    """Mask keeping exactly round((1 - sparsity) * n_blocks) random blocks."""
    bh, bw = block_shape
    grid = (-(-shape[0] // bh), -(-shape[1] // bw))
    keep = np.zeros(grid[0] * grid[1], bool)
    keep[rng.permutation(keep.size)[: round((1 - sparsity) * keep.size)]] = True
    return np.kron(keep.reshape(grid), np.ones(block_shape, bool))[: shape[0], : shape[1]]


def chained(op, reps, label="op"):
    """jit of xs (a list of R arrays) -> R outputs of op(xs[i]), serialised by optimization
    barriers (so that XLA neither merges nor reorders them).

    The XLA module is named `jit_run_<label>`, so that a profile can find its kernels.
    """

    def run(xs, *args):
        outs, prev = [], None
        for i in range(reps):
            x = xs[i] if prev is None else jax.lax.optimization_barrier((xs[i], prev))[0]
            prev = op(x, *args)
            outs.append(prev)
        return outs

    run.__name__ = f"run_{label}__"
    return jax.jit(run)


def time_jax(fn, args, reps, calls):
    """Median wall time of fn(*args) over `calls` calls, divided by reps (µs per op)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / reps * 1e6


def time_interleaved(jobs, calls):
    """Median wall time per op of several jobs {label: (fn, args, reps)}, their calls
    interleaved round-robin so that a noisy (shared) machine slows all of them alike."""
    for fn, args, _ in jobs.values():
        jax.block_until_ready(fn(*args))
    ts = {label: [] for label in jobs}
    for _ in range(calls):
        for label, (fn, args, reps) in jobs.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts[label].append((time.perf_counter() - t) / reps * 1e6)
    return {label: statistics.median(v) for label, v in ts.items()}


def _stat(event, key):
    for name, value in event.stats:
        if name == key:
            return value
    return None


def gpu_kernel_events(run, dump=False):
    """The GPU kernels that ``run()`` launches, from one profiler trace.

    Returns:
      [(kernel name, XLA module name, duration in ns)] in launch order per stream, memcpy
      and memset left out; empty when the trace holds no GPU kernels (a CPU run).
    """
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    planes = [p for f in files for p in ProfileData.from_file(f).planes]
    shutil.rmtree(d, ignore_errors=True)
    gpu = [p for p in planes if p.name.startswith("/device:GPU")]
    events = []
    for line in gpu[0].lines if gpu else ():
        if dump:
            evs = list(line.events)
            print(f"  [trace] line {line.name!r}: {len(evs)} events", flush=True)
            for e in evs[:2]:
                print(f"  [trace]   {e.name[:80]!r} {e.duration_ns} {list(e.stats)[:12]}")
        if not line.name.startswith("Stream"):
            continue
        events += [(e.name, str(_stat(e, "hlo_module") or "").rstrip("_"), e.duration_ns)
                   for e in line.events if not e.name.startswith(("Memcpy", "Memset"))]
    return events


def print_kernels(label: str, thunk: Callable[[], Any], steps: int, calls: int = 3,
                  top: int = 6) -> None:
    """Prints the GPU kernels of ``calls`` runs of ``thunk`` (a jitted call of ``steps``
    recurrent steps), per step: launches and µs by kernel name, the largest ``top``."""
    events = gpu_kernel_events(lambda: [jax.block_until_ready(thunk()) for _ in range(calls)])
    if not events:
        print(f"  kernels {label}: no GPU kernels in the trace", flush=True)
        return
    count, total = collections.Counter(), collections.Counter()
    for name, _, ns in events:
        count[name] += 1
        total[name] += ns
    per = calls * steps
    print(f"  kernels {label}: {len(events) / per:.2f} launches, "
          f"{sum(total.values()) / per / 1e3:.2f} us per step", flush=True)
    for name, ns in total.most_common(top):
        print(f"    {count[name] / per:6.2f} x {ns / count[name] / 1e3:8.2f} us  {name[:90]}",
              flush=True)


def profile_jax(jobs, calls, dump=False):
    """Device (kernel) time per op of several jitted jobs, from one profiler trace.

    Args:
      jobs: {label: (fn, args, reps)}, each fn already compiled and warm; fn's XLA module
        name must contain `label`.
      calls: calls of each fn inside the trace.

    Returns:
      {label: (µs, kernels)}: the summed durations of the GPU kernels that the label's
      module ran, over calls * reps (kernel time only: launch gaps and copies are not
      counted), and the kernel launches per op. Empty when the trace holds no GPU kernels
      (then callers fall back to wall time).
    """

    def run():
        for fn, args, _ in jobs.values():
            for _ in range(calls):
                jax.block_until_ready(fn(*args))

    kernels = {}  # module name -> [kernel durations (ns)]
    for _, module, duration in gpu_kernel_events(run, dump):
        kernels.setdefault(module, []).append(duration)
    out = {}
    for label, (_, _, reps) in jobs.items():
        durations = kernels.get(f"jit_run_{label}")
        if durations:
            out[label] = (sum(durations) / (calls * reps) / 1e3, len(durations) / (calls * reps))
    return out


def rel_err(y, ref):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


class Bench:
    def __init__(self, args):
        self.args = args
        self.records = []
        self.t0 = time.perf_counter()

    def out_of_time(self):
        return time.perf_counter() - self.t0 > self.args.budget_s

    def add(self, **rec):
        self.records.append(rec)
        us = rec.get("us")
        print(
            f"  {rec['matrix']:8s} {rec['dtype']:8s} {rec['block']:6s} N={rec['n']:<4d} "
            f"{rec['method']:14s} "
            + (
                f"{us:9.2f} us  err {rec['err']:.1e} ({rec.get('timing')}; "
                f"wall {rec.get('wall_us', float('nan')):.2f})"
                if us is not None
                else rec.get("error", "")
            ),
            flush=True,
        )

    def save(self):
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump({"meta": self.meta, "records": self.records}, f, indent=1)


def jax_methods(bench, name, k_masked, w, dtype, n, block, key, with_bcsr, pallas_cfgs):
    """Times dense / xla / pallas (/ bcsr) for one (matrix, block, dtype, N)."""
    a = bench.args
    n_in, n_out = k_masked.shape
    kd = jnp.asarray(k_masked, dtype)
    wd = jax.tree.map(jnp.asarray, w)
    k32 = jnp.asarray(jnp.asarray(k_masked, dtype), jnp.float32)
    xs = list(jax.random.normal(key, (a.reps, n, n_in), jnp.float32).astype(dtype))
    # Check on the first timed input: the fp32 product on the same rounded operands.
    ref = jnp.dot(xs[0].astype(jnp.float32), k32, precision=jax.lax.Precision.HIGHEST)
    # "auto" (bsc_matmul's default) measures its candidates once on the concrete weights
    # here; inside the timed jit (weights traced) it reuses that decision.
    chose = matmul_impl(wd, n, dtype)
    methods = {
        "dense": (lambda x, k: jnp.dot(x, k), (kd,), a.reps),
        "auto": (bsc_matmul, (wd,), a.reps),
        "xla": (bsc_matmul_xla, (wd,), a.reps_xla),
    }
    if a.mode == "cpu":  # both product forms of the XLA path, beside its automatic choice
        for product in ("dot", "fma"):
            op = functools.partial(bsc_matmul_xla, product=product)
            methods[f"xla_{product}"] = (op, (wd,), a.reps_xla)
        # The XLA path on the matrix with its layout precomputed (`with_xla_layout`: what
        # `bsrnn.inference` and the recurrent kernels' weight builders pass it).
        methods["xla_layout"] = (bsc_matmul_xla, (jax.tree.map(jnp.asarray, with_xla_layout(w)),),
                                 a.reps_xla)
    for label, cfg in pallas_cfgs.items():
        methods[label] = (
            lambda x, w, cfg=cfg: bsc_matmul_pallas(x, w, **cfg),
            (wd,),
            a.reps,
        )
    if with_bcsr:
        from jax.experimental import sparse

        kt = sparse.BCSR.fromdense(kd.T, nse=int(np.count_nonzero(k_masked)))
        methods["bcsr"] = (lambda x, kt: (kt @ x.T).T, (kt,), 2)
    recs, jobs = {}, {}
    for method, (op, extra, reps) in methods.items():
        rec = dict(matrix=name, dtype=jnp.dtype(dtype).name, block=block, n=n, method=method)
        if method == "auto":
            rec["chose"] = chose
        try:
            fn = chained(op, reps, method)
            err = rel_err(fn(xs[:reps], *extra)[0], ref)
            recs[method] = dict(rec, err=err)
            jobs[method] = (fn, (xs[:reps], *extra), reps)
        except Exception as e:  # noqa: BLE001  (record and carry on: one run, many methods)
            recs[method] = dict(rec, us=None, error=f"{type(e).__name__}: {str(e)[:300]}")
    for method, wall in time_interleaved(jobs, a.calls).items():
        recs[method].update(us=wall, wall_us=wall, timing="wall")
    if a.mode == "gpu" and jobs:
        for method, (us, launches) in profile_jax(jobs, a.calls_profile).items():
            recs[method].update(us=us, timing="kernel", kernels_per_op=launches)
    dense = recs["dense"].get("us")
    for rec in recs.values():
        if rec.get("us") and dense:
            rec["ratio"] = dense / rec["us"]
        bench.add(**rec)


def torch_methods(bench, name, k_masked, dtype_name, n, block, seed):
    """Times torch dense / CSR / BSR for one case (GPU mode)."""
    import torch

    a = bench.args
    dt = {"float16": torch.float16, "float32": torch.float32}[dtype_name]
    n_in, n_out = k_masked.shape
    w = torch.tensor(np.ascontiguousarray(k_masked.T), device="cuda", dtype=dt)  # (out, in)
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = torch.randn(a.reps, n_in, n, device="cuda", dtype=dt, generator=g)
    xcheck = torch.randn(n_in, n, device="cuda", dtype=dt, generator=g)
    ref = (w.double() @ xcheck.double()).cpu().numpy()
    bh, bw = (int(s) for s in block.split("x"))
    variants = {"t_dense": lambda: w}
    if bh == bw == 1:
        variants["t_csr"] = lambda: w.to_sparse_csr()
    else:
        variants["t_bsr"] = lambda: w.to_sparse_bsr((bw, bh))  # W = K^T: blocks transpose
    if block == "4x4":
        variants["t_csr"] = lambda: w.to_sparse_csr()
    results = {}
    for method, make in variants.items():
        rec = dict(matrix=name, dtype=dtype_name, block=block, n=n, method=method)
        try:
            wm = make()
            y = torch.mm(wm, xcheck)
            err = rel_err(y.float().cpu().numpy(), ref)
            torch.cuda.synchronize()
            outs = [None] * a.reps
            for i in range(a.reps):  # warm-up (and Triton compilation) outside the graph
                outs[i] = torch.mm(wm, xs[i])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            how = "graph"
            try:
                with torch.cuda.graph(graph):
                    for i in range(a.reps):
                        outs[i] = torch.mm(wm, xs[i])
                run = graph.replay
            except Exception:  # noqa: BLE001  (some sparse paths sync on the host)
                how = "eager"
                torch.cuda.synchronize()

                def run(wm=wm, outs=outs):
                    for i in range(a.reps):
                        outs[i] = torch.mm(wm, xs[i])

            run()
            torch.cuda.synchronize()
            ts = []
            for _ in range(a.calls):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run()
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e) * 1e3 / a.reps)
            us = statistics.median(ts)
            results[method] = us
            bench.add(**rec, us=us, err=err, ratio=None, timing=how)
        except Exception as e:  # noqa: BLE001
            bench.add(**rec, us=None, error=f"{type(e).__name__}: {str(e)[:300]}")
    dense = results.get("t_dense")
    for r in bench.records[-len(variants) :]:
        if r.get("us") and dense:
            r["ratio"] = dense / r["us"]
    return results


def _cfg_name(cfg):
    return f"w{cfg[0]}_r{cfg[1]}_s{cfg[2]}"


def tune_pallas(bench):
    """Sweeps Pallas launch parameters (num_warps, rows_per_step, num_stages) on a few fp16
    cases; returns {cfg: [time / best time of the case, per case]}."""
    rng = np.random.default_rng(7)
    reps = bench.args.reps
    scores = {}
    cases = (
        ("gru2560", 4, 1),
        ("gru2560", 16, 32),
        ("rnn1760", 4, 1),
        ("rnn1760", 16, 32),
        ("rnn1760", 32, 8),
    )
    for name, b, n in cases:
        if bench.out_of_time():
            break
        n_in, n_out, sp = MATRICES[name]
        k = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
        mask = block_mask(rng, (n_in, n_out), (b, b), sp)
        w = jax.tree.map(jnp.asarray, from_dense(k, mask, (b, b), dtype=jnp.float16))
        xs = list(jax.random.normal(jax.random.key(n), (reps, n, n_in), jnp.float16))
        jobs = {}
        for cfg in itertools.product((2, 4), (64, 128, 256), (1, 3)):
            kw = dict(num_warps=cfg[0], rows_per_step=cfg[1], num_stages=cfg[2])
            fn = chained(functools.partial(bsc_matmul_pallas, **kw), reps, _cfg_name(cfg))
            try:
                jax.block_until_ready(fn(xs, w))
                jobs[cfg] = (fn, (xs, w), reps)
            except Exception as e:  # noqa: BLE001
                print(f"  tune {kw}: {type(e).__name__}: {str(e)[:200]}")
        times = profile_jax(
            {_cfg_name(c): job for c, job in jobs.items()},
            bench.args.calls_profile,
            dump=not scores,
        )
        if times:
            row = {c: times[_cfg_name(c)][0] for c in jobs if _cfg_name(c) in times}
        else:
            row = {c: time_jax(*job, bench.args.calls) for c, job in jobs.items()}
        if not row:
            continue
        print(
            f"  tune {name} {b}x{b} N={n}: "
            + " ".join(f"{_cfg_name(c)}={us:.2f}" for c, us in row.items()),
            flush=True,
        )
        for cfg, us in row.items():
            scores.setdefault(cfg, []).append(us / min(row.values()))
        bench.records.append(
            dict(
                kind="tune",
                matrix=name,
                block=f"{b}x{b}",
                n=n,
                us={_cfg_name(c): v for c, v in row.items()},
            )
        )
    return scores


def markdown_tables(records, methods, dtypes):
    lines = []
    for name in MATRICES:
        for dtype in dtypes:
            recs = [
                r
                for r in records
                if r.get("matrix") == name and r.get("dtype") == dtype and "method" in r
            ]
            if not recs:
                continue
            blocks = sorted({r["block"] for r in recs}, key=lambda s: (int(s.split("x")[0]), s))
            ns = sorted({r["n"] for r in recs})
            lines.append(f"\n{name} {dtype}: µs per product (ratio = dense time / this time)\n")
            lines.append("| block | method | " + " | ".join(f"N={n}" for n in ns) + " |")
            lines.append("|---|---|" + "---|" * len(ns))
            for b in blocks:
                for m in methods:
                    cells = []
                    for n in ns:
                        r = next(
                            (
                                r
                                for r in recs
                                if r["block"] == b and r["n"] == n and r["method"] == m
                            ),
                            None,
                        )
                        if r is None:
                            cells.append("")
                        elif r.get("us") is None:
                            cells.append("error")
                        else:
                            ratio = f" ({r['ratio']:.2f}×)" if r.get("ratio") else ""
                            chose = f" {r['chose']}" if r.get("chose") else ""
                            cells.append(f"{r['us']:.1f}{ratio}{chose}")
                    if any(cells):
                        lines.append(f"| {b} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--json", default="")
    p.add_argument("--commit", default="")
    p.add_argument("--reps", type=int, default=0, help="ops per jitted call (0: per mode)")
    p.add_argument("--reps_xla", type=int, default=0)
    p.add_argument("--calls", type=int, default=0)
    p.add_argument("--calls_profile", type=int, default=5)
    p.add_argument("--budget_s", type=float, default=480.0)
    p.add_argument("--tune", action="store_true", help="sweep Pallas launch parameters first")
    p.add_argument("--blocks", default="")
    p.add_argument("--fp32_blocks", default="1x1,4x4,8x8,16x16,32x32", help="GPU mode")
    p.add_argument("--dtypes", default="")
    p.add_argument("--ns", default="")
    p.add_argument("--matrices", default="")
    p.add_argument("--markdown", default="", help="also write the tables to this file")
    a = p.parse_args(argv)
    gpu = a.mode == "gpu"
    a.reps = a.reps or (16 if gpu else 8)
    a.reps_xla = min(a.reps_xla or (16 if gpu else 8), a.reps)
    a.calls = a.calls or (10 if gpu else 40)
    blocks = a.blocks or ("1x1,4x4,8x8,16x16,32x32,12x2" if gpu else "4x4,12x2,8x8,16x16,32x32")
    blocks = [tuple(int(s) for s in b.split("x")) for b in blocks.split(",")]
    dtypes = (a.dtypes or ("float16,float32" if gpu else "float32")).split(",")
    ns = [int(s) for s in (a.ns or ("1,8,32,128" if gpu else "1,2,8")).split(",")]
    matrices = (a.matrices or ("rnn1760,gru2560" if gpu else "rnn1760")).split(",")

    bench = Bench(a)
    bench.meta = dict(
        date=time.strftime("%Y-%m-%d"),
        mode=a.mode,
        commit=a.commit,
        argv=sys.argv,
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        python=platform.python_version(),
        machine=platform.machine(),
        reps=a.reps,
        reps_xla=a.reps_xla,
        calls=a.calls,
    )
    if gpu:
        import torch

        bench.meta.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            bench.meta["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(bench.meta), flush=True)

    # "pallas": the kernel's defaults; "pallas_xt": gathering from x^T at every N;
    # "pallas_dot": tensor-core dots at every N, 64 panel rows per step, x not transposed.
    pallas_cfgs = {}
    if gpu:
        pallas_cfgs = {
            "pallas": {},
            "pallas_xt": {"transpose_x": True},
            "pallas_dot": {"compute": "dot", "rows_per_step": 64, "transpose_x": False},
        }
    if gpu and a.tune:
        best = tune_pallas(bench)
        if best:
            cfg = min(best, key=lambda c: statistics.mean(best[c]))
            print(
                f"  tune: best mean-normalised config {_cfg_name(cfg)}",
                flush=True,
            )
            pallas_cfgs["pallas_tuned"] = dict(
                num_warps=cfg[0], rows_per_step=cfg[1], num_stages=cfg[2]
            )
            bench.meta["pallas_tuned"] = pallas_cfgs["pallas_tuned"]
        bench.save()

    rng = np.random.default_rng(0)
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        for name in matrices:
            n_in, n_out, sp = MATRICES[name]
            k = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
            for bs in blocks:
                block = f"{bs[0]}x{bs[1]}"
                if gpu and dtype_name == "float32" and block not in a.fp32_blocks.split(","):
                    continue
                mask = block_mask(rng, (n_in, n_out), bs, sp)
                k_masked = k * mask
                w: BlockSparseMatrix = from_dense(k, mask, bs, dtype=dtype)
                for n in ns:
                    if bench.out_of_time():
                        print("  time budget spent: stopping", flush=True)
                        break
                    key = jax.random.key(hash((name, block, n)) % 2**31)
                    jax_methods(
                        bench,
                        name,
                        k_masked,
                        w,
                        dtype,
                        n,
                        block,
                        key,
                        with_bcsr=gpu and block == "4x4" and n in (1, 32),
                        pallas_cfgs=pallas_cfgs,
                    )
                    if gpu:
                        try:
                            torch_methods(bench, name, k_masked, dtype_name, n, block, seed=n)
                        except Exception as e:  # noqa: BLE001
                            bench.add(
                                matrix=name,
                                dtype=dtype_name,
                                block=block,
                                n=n,
                                method="t_dense",
                                us=None,
                                error=f"{type(e).__name__}: {str(e)[:300]}",
                            )
                    bench.save()
    methods = ["dense", "auto", "xla", "xla_dot", "xla_fma", *pallas_cfgs, "bcsr", "t_dense",
               "t_csr", "t_bsr"]
    tables = markdown_tables(bench.records, methods, dtypes)
    print(tables)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(tables + "\n")
    print(f"total {time.perf_counter() - bench.t0:.0f} s")
    bench.save()


if __name__ == "__main__":
    main()
