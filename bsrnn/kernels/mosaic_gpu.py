"""GRU recurrence with block-sparse recurrent weights in Pallas Mosaic GPU (Hopper, sm_90).

Same arithmetic as `bsrnn.kernels.recurrence.gru_recurrence` (gate order r, z, n of
`bsrnn.cells`; gate math in float32, state rounded to the weights' dtype every step):

    a = h_t @ W_h,  r = σ(xp_r + a_r),  z = σ(xp_z + a_z),
    n = tanh(xp_n + r ⊙ (a_n + b_hn)),  h_{t+1} = (1 − z) ⊙ n + z ⊙ h_t

One kernel launch per step, inside `lax.scan(..., unroll=U)`. Everything is kept transposed,
features × batch, so that the tensor cores' 64-row side runs over output features and the
batch is the narrow side (N = batch rounded up to 16, 32 or a multiple of 64):

- The recurrent weights are re-tiled on the host into 16×16 tiles (any block shape; an
  all-zero tile is dropped). Program j owns output features 16j .. 16j + 15 of all three
  gates. For each gate its tiles are packed C at a time into chunks: a panel W^T (16, 16·C)
  (the tiles side by side, transposed) and the C input-feature offsets they multiply.
- Per chunk, one TMA copy brings the panel into rows 0..15 of a (64, 16·C) shared-memory
  slot (rows 16..63 are never read back: they only feed accumulator rows that are dropped)
  and C TMA copies gather the matching (16, N) slices of h_t^T into a (16·C, N) slot; one
  `wgmma` (64 × 16·C × N) accumulates the gate's pre-activation. Chunks go through a ring of
  `stages` slots, so several chunks' copies are in flight while the tensor core works.
- The step's input projections, h_t and b_hn for the program's 16 features come by TMA
  (issued first, overlapping the product); the gate math runs on the accumulators in
  registers; h_{t+1}^T rows go back to the state buffer by TMA.

Each launch reads h_t^T (Hq, N), Hq = ceil(H / 16)·16, and writes a fresh h_{t+1}^T (the
kernel is a `plgpu.kernel`, which has no input/output aliasing; jax 0.11.2 fails the
deprecated `pallas_call` route for these kernels); the step index comes from a one-element
counter that each launch reads and passes on incremented; the states of the U launches of a
scan iteration are stacked once. Padding features and batch columns stay finite (zero
weights, zero inputs).

Measured on an H200 (WORKSPACE.md, "Mosaic GPU recurrence kernel"; GRU 2560, 90% of 16x16
blocks pruned, fp16, T = 256, input projection included): 10.6 / 11.1 / 13.5 µs per step at
batch 1 / 8 / 32, against the Triton step kernel's 6.4 / 11.9 / 16.9 and the dense fp16
scan's 14.3 / 11.2 / 13.4: ahead of the Triton kernels only at batch >= 8, level with dense
at 32, far from the issue's 2 / 3 / 4 µs. Batch 1 and 8 cost the same, so a step looks
bound by latency (likely the chain of dependent scalar loads, TMA round trips and waits in
each program; not profiled), not by bytes or tensor-core work.

`gru_recurrence_mosaic` is the entry point; `unsupported` says, before any launch, why it
cannot run here (no GPU, not Hopper, dtype, batch, shared memory), or None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

try:  # jax builds without Mosaic GPU still import this module
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jax build
    plgpu = None

TILE = 16  # side of the re-tiled weight blocks (the wgmma K step for 16-bit operands)
ROWS = 64  # wgmma M: accumulator rows (16 real output features, 48 dropped)
MAX_BATCH = 256  # wgmma N limit
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
# Defaults: the fastest of (chunk, stages) = (4, 6), (8, 4), (16, 2) on the H200 (WORKSPACE.md,
# "Mosaic GPU recurrence kernel"): smaller chunks pad less and keep more chunks in flight.
CHUNK, STAGES = 4, 6


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Host-side layout of one weight set for the kernel (numpy arrays, static ints)."""

    hq: int  # H rounded up to TILE
    chunk: int  # tiles per chunk (C)
    wt: np.ndarray  # (n_chunks, TILE, TILE·C) W^T panels
    rows: np.ndarray  # (n_chunks·C,) int32 input tile row of each tile (padding: 0)
    ptr: np.ndarray  # (3·Hq/TILE + 1,) int32 chunk pointer per (program, gate)
    b_hn: np.ndarray  # (Hq,) recurrent bias of the n gate, zero-padded


def batch_columns(batch: int) -> int:
    """N of the kernel: the batch rounded up to 16, 32 or a multiple of 64."""
    if batch <= 16:
        return 16
    if batch <= 32:
        return 32
    return -(-batch // 64) * 64


def _swizzle(n_cols: int, itemsize: int) -> int:
    return min(128, n_cols * itemsize)


def smem_bytes(batch: int, chunk: int = CHUNK, stages: int = STAGES, itemsize: int = 2) -> int:
    """Shared memory one program uses: the ring slots, the gate inputs and the output."""
    n = batch_columns(batch)
    slots = stages * (ROWS * TILE * chunk + TILE * chunk * n) * itemsize
    gate_io = 6 * ROWS * n * itemsize
    return slots + gate_io + 1024  # barriers and alignment


def unsupported(weights: Any, batch: int, *, chunk: int = CHUNK,
                stages: int = STAGES) -> str | None:
    """Why `gru_recurrence_mosaic` cannot run here for these weights and batch, or None.

    Args:
      weights: `bsrnn.kernels.recurrence.SparseGRUWeights`.
      batch: B of the sequences to run.
      chunk, stages: the kernel's tiles per chunk and ring depth.

    Returns:
      A sentence saying what is missing (and what to use instead), or None if it can run.
    """
    if plgpu is None:
        return "this jax build has no jax.experimental.pallas.mosaic_gpu"
    if jax.default_backend() != "gpu":
        return f"needs a GPU, the default backend is {jax.default_backend()!r}"
    device = jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if cc is None or not str(cc).startswith("9"):
        return (f"needs a Hopper GPU (compute capability 9.x, for wgmma), {device.device_kind} "
                f"has {cc}")
    if np.dtype(weights.dtype) not in DTYPES:
        return f"needs float16 or bfloat16 weights (wgmma operands), got {weights.dtype}"
    if not 1 <= batch <= MAX_BATCH:
        return f"batch must be in 1..{MAX_BATCH} (wgmma N), got {batch}"
    itemsize = np.dtype(weights.dtype).itemsize
    need = smem_bytes(batch, _min_chunk(chunk, batch, itemsize), stages, itemsize)
    if need > SMEM_LIMIT:
        return (f"needs {need} bytes of shared memory per program at batch {batch}, more than "
                f"the {SMEM_LIMIT} a block may use: lower stages or chunk, or split the batch")
    return None


def _plan(weights: Any, chunk: int) -> _Plan:
    """Re-tiles W_h into per-(program, gate) chunks of 16×16 tiles (host, numpy)."""
    w_h, hidden = weights.w_h, weights.hidden
    try:
        values = np.asarray(w_h.values, np.float32)
        row_idx, col_ptr = np.asarray(w_h.row_indices), np.asarray(w_h.col_ptr)
        b_hn = np.asarray(weights.b_hn, np.float32)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise ValueError(
            "gru_recurrence_mosaic re-lays the weights out on the host: pass concrete weights "
            "(from sparse_gru_weights), not traced ones (close over them instead of passing "
            "them through jit)") from None
    (bh, bw), (nbr, nbc) = w_h.block_shape, w_h.grid_shape
    col_ids = np.repeat(np.arange(nbc), np.diff(col_ptr))
    dense = np.zeros((nbr, bh, nbc, bw), np.float32)
    dense[row_idx, :, col_ids, :] = values
    dense = dense.reshape(nbr * bh, nbc * bw)
    hp = w_h.shape[1] // 3  # per-gate padded width of W_h
    hq = -(-hidden // TILE) * TILE
    nq = hq // TILE
    gates = np.zeros((3, hq, hq), np.float32)
    for g in range(3):
        gates[g, :hidden, :hidden] = dense[:hidden, g * hp:g * hp + hidden]
    tiles = gates.reshape(3, nq, TILE, nq, TILE).transpose(3, 0, 1, 4, 2)  # j, g, i, out, in
    kept = np.abs(tiles).sum(axis=(3, 4)) > 0  # (nq, 3, nq): program j, gate g, tile row i
    panels, rows, ptr = [], [], [0]
    for j in range(nq):
        for g in range(3):
            (tile_rows,) = np.nonzero(kept[j, g])
            for s in range(0, tile_rows.size, chunk):
                part = tile_rows[s:s + chunk]
                panel = np.zeros((TILE, chunk, TILE), np.float32)
                panel[:, :part.size] = tiles[j, g, part].transpose(1, 0, 2)
                panels.append(panel.reshape(TILE, chunk * TILE))
                rows.append(np.pad(part, (0, chunk - part.size)))
            ptr.append(len(panels))
    if not panels:  # every tile pruned: one zero chunk keeps the arrays non-empty
        panels, rows = [np.zeros((TILE, chunk * TILE), np.float32)], [np.zeros(chunk, int)]
    dtype = np.dtype(weights.dtype)
    return _Plan(
        hq=hq, chunk=chunk, wt=np.stack(panels).astype(dtype),
        rows=np.concatenate(rows).astype(np.int32), ptr=np.asarray(ptr, np.int32),
        b_hn=np.pad(b_hn, (0, hq - hidden)).astype(dtype))


def _min_chunk(chunk: int, batch: int, itemsize: int) -> int:
    """`chunk` raised so that K = 16·chunk holds whole swizzle tiles: wgmma wants one
    swizzle for both operands, and the narrow side (N) sets it."""
    return max(chunk, _swizzle(batch_columns(batch), itemsize) // itemsize // TILE)


def _mma_transforms(n_cols: int, itemsize: int) -> tuple[Any, ...]:
    swizzle = _swizzle(n_cols, itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _step_kernel(plan: _Plan, n: int, dtype: Any, stages: int, interpret: Any):
    """One step as a Mosaic GPU kernel: (cnt, hT_t, xpT, b_hnT, wt, rows, ptr) ->
    (hT_{t+1}, cnt + 1), hT of shape (Hq, N), t = cnt[0] (indexes xpT)."""
    hq, chunk = plan.hq, plan.chunk
    nq = hq // TILE
    k = TILE * chunk
    itemsize = np.dtype(dtype).itemsize
    # wgmma needs one swizzle for both operands: the narrow side (N) sets it.
    tr = _mma_transforms(n, itemsize)

    def body(cnt_ref, h_ref, xp_ref, bhn_ref, wt_ref, rows_ref, ptr_ref, out_ref, cnt_out,
             a_smem, b_smem, io_smem, out_smem, ring_bar, io_bar):
        j = jax.lax.axis_index("j")
        t = cnt_ref[0]
        first = ptr_ref[3 * j]
        last = ptr_ref[3 * j + 3]

        # The step's gate inputs for features 16j.. (rows 0..15 of each io slot).
        feat = pl.ds(j * TILE, TILE)
        for g in range(3):
            plgpu.copy_gmem_to_smem(
                xp_ref.at[pl.ds(((t * 3 + g) * nq + j) * TILE, TILE)],
                io_smem.at[g, pl.ds(0, TILE)], io_bar)
        plgpu.copy_gmem_to_smem(h_ref.at[feat], io_smem.at[3, pl.ds(0, TILE)], io_bar)
        plgpu.copy_gmem_to_smem(bhn_ref.at[feat], io_smem.at[4, pl.ds(0, TILE)], io_bar)

        def fetch(q):  # chunk q (absolute index) into ring slot (q - first) % stages
            slot = jax.lax.rem(q - first, stages)
            plgpu.copy_gmem_to_smem(wt_ref.at[q], a_smem.at[slot, pl.ds(0, TILE)],
                                    ring_bar.at[slot])
            for c in range(chunk):
                # offsets written as multiples of TILE: TMA into tiled shared memory
                # needs them provably aligned
                row = rows_ref[q * chunk + c] * TILE
                plgpu.copy_gmem_to_smem(h_ref.at[pl.ds(row, TILE)],
                                        b_smem.at[slot, pl.ds(c * TILE, TILE)],
                                        ring_bar.at[slot])

        for s in range(stages):
            pl.when(first + s < last)(functools.partial(fetch, first + s))

        def gate_product(g):
            def scope(acc):
                def step(q, carry):
                    slot = jax.lax.rem(q - first, stages)
                    plgpu.barrier_wait(ring_bar.at[slot])
                    plgpu.wgmma(acc, a_smem.at[slot], b_smem.at[slot])
                    plgpu.wgmma_wait(0)
                    pl.when(q + stages < last)(functools.partial(fetch, q + stages))
                    return carry

                jax.lax.fori_loop(ptr_ref[3 * j + g], ptr_ref[3 * j + g + 1], step, 0)
                return acc[...]

            return pl.run_scoped(scope, plgpu.ACC((ROWS, n), jnp.float32))

        a_r, a_z, a_n = (gate_product(g) for g in range(3))
        plgpu.barrier_wait(io_bar)
        wgmma = plgpu.Layout.WGMMA
        x_r, x_z, x_n, h, b_hn = (
            plgpu.load(io_smem.at[i], (), layout=wgmma).astype(jnp.float32) for i in range(5))
        r = 1.0 / (1.0 + jnp.exp(-(x_r + a_r)))
        z = 1.0 / (1.0 + jnp.exp(-(x_z + a_z)))
        nn = jnp.tanh(x_n + r * (a_n + b_hn))
        out_smem[...] = ((1.0 - z) * nn + z * h).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, TILE)], out_ref.at[feat])

        @pl.when(j == 0)
        def _():
            cnt_out[0] = t + 1

        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((hq, n), dtype), jax.ShapeDtypeStruct((1,), jnp.int32)),
        scratch_types=[
            plgpu.SMEM((stages, ROWS, k), dtype, transforms=tr),
            plgpu.SMEM((stages, k, n), dtype, transforms=tr),
            plgpu.SMEM((5, ROWS, n), dtype, transforms=tr),
            plgpu.SMEM((ROWS, n), dtype, transforms=tr),
            plgpu.Barrier(num_arrivals=1 + chunk, num_barriers=stages),
            plgpu.Barrier(num_arrivals=5),
        ],
        grid=(nq,),
        grid_names=("j",),
        **({} if interpret is None else {"interpret": interpret}),
    )


def gru_recurrence_mosaic(
    xp: jax.Array,
    weights: Any,
    h0: jax.Array,
    *,
    unroll: int = 16,
    chunk: int = CHUNK,
    stages: int = STAGES,
    interpret: Any = None,
) -> jax.Array:
    """All GRU states from the input projections, one Mosaic GPU kernel per step.

    Args:
      xp: (T, B, 3·H) input projections (`bsrnn.kernels.recurrence.gru_input_projection`).
      weights: `bsrnn.kernels.recurrence.SparseGRUWeights` with concrete arrays (the layout
        is rebuilt on the host, once per call); float16 or bfloat16.
      h0: (B, H) initial state.
      unroll: `lax.scan` unroll factor of the step loop.
      chunk: 16×16 tiles per tensor-core product (K = 16·chunk); a power of two <= 16,
        raised where needed to fill the operands' swizzle tile (4 at batch > 32).
      stages: ring slots of chunks in flight per program.
      interpret: Mosaic GPU interpreter parameters (tests on machines without a GPU), or None
        to compile for the GPU.

    Returns:
      (T, B, H) states h_1 .. h_T in the weights' dtype.

    Raises:
      ValueError: on mismatched shapes, traced weights, or (when compiling, not interpreting)
        whatever `unsupported` reports.
    """
    steps, batch, three_h = xp.shape
    hidden = weights.hidden
    if three_h != 3 * hidden:
        raise ValueError(f"xp has {three_h} features, expected 3·H = {3 * hidden}")
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 has shape {h0.shape}, expected {(batch, hidden)}")
    if chunk not in (1, 2, 4, 8, 16):
        raise ValueError(f"chunk must be a power of two <= 16, got {chunk}")
    chunk = _min_chunk(chunk, batch, np.dtype(weights.dtype).itemsize)
    if interpret is None and (reason := unsupported(weights, batch, chunk=chunk,
                                                    stages=stages)):
        raise ValueError(f"gru_recurrence_mosaic cannot run: {reason}")
    dtype = np.dtype(weights.dtype)
    if steps == 0:
        return jnp.zeros((0, batch, hidden), dtype)
    plan = _plan(weights, chunk)
    hq, n = plan.hq, batch_columns(batch)
    pad_h, pad_b = hq - hidden, n - batch
    xpt = xp.astype(dtype).reshape(steps, batch, 3, hidden)
    xpt = jnp.pad(xpt, ((0, 0), (0, pad_b), (0, 0), (0, pad_h))).transpose(0, 2, 3, 1)
    xpt = xpt.reshape(steps * 3 * hq, n)
    h0t = jnp.pad(h0.astype(dtype), ((0, pad_b), (0, pad_h))).T
    bhn = jnp.broadcast_to(jnp.asarray(plan.b_hn)[:, None], (hq, n))
    consts = (xpt, bhn, jnp.asarray(plan.wt), jnp.asarray(plan.rows), jnp.asarray(plan.ptr))
    kernel = _step_kernel(plan, n, dtype, stages, interpret)

    def steps_of(carry, count):  # `count` launches; their states stacked once
        states = []
        for _ in range(count):
            carry = kernel(carry[1], carry[0], *consts)
            states.append(carry[0])
        return carry, jnp.stack(states)

    unroll = max(1, min(unroll, steps))
    carry = (h0t, jnp.zeros((1,), jnp.int32))
    carry, out = jax.lax.scan(lambda c, _: steps_of(c, unroll), carry, None,
                              length=steps // unroll)
    out = out.reshape(-1, hq, n)
    if steps % unroll:
        out = jnp.concatenate([out, steps_of(carry, steps % unroll)[1]])
    out = out[:, :hidden, :batch]
    return out.transpose(0, 2, 1)


# --- The persistent kernel: one launch for all steps, weights resident in shared memory ---
#
# Same arithmetic and transposed layout as the step kernel above, but each program loads its
# W^T panels into shared memory ONCE and loops over the steps itself. Programs exchange
# states through a ((T + 1)·Hq, N) buffer in device memory (state t in rows t·Hq..: written
# once, never overwritten, so a program that runs ahead cannot clobber what a slower one
# still reads) and meet at a counter in a global semaphore: after writing its 16 rows of
# h_{t+1} (TMA store, awaited), a program adds 1 with release semantics; before gathering
# h_t it polls (acquire) until the counter reaches nq·(t + 1). The panels of program j sit
# in rows 16·c.. of one (16·C_max + 48, 16·C) buffer, and chunk c's wgmma A operand is the
# 64-row window from row 16·c: its rows 16..63 are the next chunks' panels, which only feed
# accumulator rows that are dropped (the step kernel allocates them as dead rows instead,
# 4x the memory). A poll that gives up after `spin_limit` tries is counted in a per-program
# sync word, and the caller turns the states into an error (never numbers).

SPIN_LIMIT = 1 << 18  # polls (~0.1-0.3 s) before a barrier wait gives up
_TMA_ROWS = 256  # the most rows one TMA copy moves


def _resident_panels(plan: _Plan) -> tuple[np.ndarray, int]:
    """(nq, 16·C_max + 48, 16·C) each program's W^T panels stacked by rows, padded with zeros,
    and C_max, the most chunks any program has."""
    nq = plan.hq // TILE
    counts = plan.ptr[3::3] - plan.ptr[0:-1:3]
    max_chunks = max(int(counts.max()), 1)
    rows = TILE * max_chunks + ROWS - TILE
    out = np.zeros((nq, rows, TILE * plan.chunk), plan.wt.dtype)
    for j in range(nq):
        first = int(plan.ptr[3 * j])
        out[j, :TILE * int(counts[j])] = plan.wt[first:first + int(counts[j])].reshape(
            -1, TILE * plan.chunk)
    return out, max_chunks


def persistent_smem_bytes(batch: int, max_chunks: int, chunk: int = CHUNK,
                          stages: int = STAGES, itemsize: int = 2) -> int:
    """Shared memory one program of the persistent kernel uses: its resident panels, the
    ring of gathered h slices, the gate inputs and the output."""
    n = batch_columns(batch)
    panels = (TILE * max_chunks + ROWS - TILE) * TILE * chunk * itemsize
    ring = stages * TILE * chunk * n * itemsize
    return panels + ring + 6 * ROWS * n * itemsize + 1024


def _persistent_kernel(plan: _Plan, res_rows: int, n: int, dtype: Any, stages: int,
                       steps: int, spin_limit: int | None, interpret: Any):
    """All steps as one Mosaic GPU kernel: (xpT, h0T, b_hnT, panels, rows, ptr) ->
    (states ((T + 1)·Hq, N), give-ups (nq,))."""
    hq, chunk = plan.hq, plan.chunk
    nq = hq // TILE
    k = TILE * chunk
    tr = _mma_transforms(n, np.dtype(dtype).itemsize)
    pieces = [(r, min(_TMA_ROWS, res_rows - r)) for r in range(0, res_rows, _TMA_ROWS)]

    def body(xp_ref, h0_ref, bhn_ref, wt_ref, rows_ref, ptr_ref, out_ref, sync_ref,
             a_res, b_smem, io_smem, out_smem, w_bar, ring_bar, io_bar):
        j = jax.lax.axis_index("j")
        first = ptr_ref[3 * j]
        last = ptr_ref[3 * j + 3]
        feat = pl.ds(j * TILE, TILE)
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR((1,))).at[0]

        # Once: the program's panels, b_hn, and h_0 (passed on as state 0).
        for start, size in pieces:
            plgpu.copy_gmem_to_smem(wt_ref.at[j, pl.ds(start, size)],
                                    a_res.at[pl.ds(start, size)], w_bar)
        plgpu.copy_gmem_to_smem(bhn_ref.at[feat], io_smem.at[4, pl.ds(0, TILE)], w_bar)
        plgpu.copy_gmem_to_smem(h0_ref.at[feat], out_smem.at[pl.ds(0, TILE)], w_bar)
        plgpu.barrier_wait(w_bar)
        plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, TILE)], out_ref.at[feat])
        plgpu.wait_smem_to_gmem(0)
        plgpu.semaphore_signal(sem, 1, memory_scope="gpu")

        def wait_for(target):  # polls the counter; returns 1 if it gave up, else 0
            if spin_limit is None:  # one thread spins (relaxed loads), no way out
                plgpu.semaphore_wait(sem, target, decrement=False, memory_scope="gpu")
                return jnp.zeros((), jnp.int32)

            def cond(carry):
                value, polls = carry
                return (value < target) & (polls < spin_limit)

            def poll(carry):
                return pl.semaphore_read(sem), carry[1] + 1

            _, polls = jax.lax.while_loop(cond, poll, (pl.semaphore_read(sem), 0))
            return (polls >= spin_limit).astype(jnp.int32)

        def step(t, give_ups):
            # The step's input projections do not depend on h_t: issued before the wait.
            for g in range(3):
                plgpu.copy_gmem_to_smem(
                    xp_ref.at[pl.ds(((t * 3 + g) * nq + j) * TILE, TILE)],
                    io_smem.at[g, pl.ds(0, TILE)], io_bar)
            give_ups = give_ups + wait_for(nq * (t + 1))
            base = t * hq  # state t
            plgpu.copy_gmem_to_smem(out_ref.at[pl.ds(base + j * TILE, TILE)],
                                    io_smem.at[3, pl.ds(0, TILE)], io_bar)

            def fetch(q):  # the h_t slices of chunk q into ring slot (q - first) % stages
                slot = jax.lax.rem(q - first, stages)
                for c in range(chunk):
                    row = base + rows_ref[q * chunk + c] * TILE
                    plgpu.copy_gmem_to_smem(out_ref.at[pl.ds(row, TILE)],
                                            b_smem.at[slot, pl.ds(c * TILE, TILE)],
                                            ring_bar.at[slot])

            for s in range(stages):
                pl.when(first + s < last)(functools.partial(fetch, first + s))

            def gate_product(g):
                def scope(acc):
                    def chunk_step(q, carry):
                        slot = jax.lax.rem(q - first, stages)
                        plgpu.barrier_wait(ring_bar.at[slot])
                        plgpu.wgmma(acc, a_res.at[pl.ds((q - first) * TILE, ROWS)],
                                    b_smem.at[slot])
                        plgpu.wgmma_wait(0)
                        pl.when(q + stages < last)(functools.partial(fetch, q + stages))
                        return carry

                    jax.lax.fori_loop(ptr_ref[3 * j + g], ptr_ref[3 * j + g + 1],
                                      chunk_step, 0)
                    return acc[...]

                return pl.run_scoped(scope, plgpu.ACC((ROWS, n), jnp.float32))

            a_r, a_z, a_n = (gate_product(g) for g in range(3))
            plgpu.barrier_wait(io_bar)
            wgmma = plgpu.Layout.WGMMA
            x_r, x_z, x_n, h, b_hn = (
                plgpu.load(io_smem.at[i], (), layout=wgmma).astype(jnp.float32)
                for i in range(5))
            r = 1.0 / (1.0 + jnp.exp(-(x_r + a_r)))
            z = 1.0 / (1.0 + jnp.exp(-(x_z + a_z)))
            nn = jnp.tanh(x_n + r * (a_n + b_hn))
            out_smem[...] = ((1.0 - z) * nn + z * h).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, TILE)],
                                    out_ref.at[pl.ds(base + hq + j * TILE, TILE)])
            plgpu.wait_smem_to_gmem(0)
            plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
            return give_ups

        sync_ref[j] = jax.lax.fori_loop(0, steps, step, jnp.zeros((), jnp.int32))

    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(((steps + 1) * hq, n), dtype),
                  jax.ShapeDtypeStruct((nq,), jnp.int32)),
        scratch_types=[
            plgpu.SMEM((res_rows, k), dtype, transforms=tr),
            plgpu.SMEM((stages, k, n), dtype, transforms=tr),
            plgpu.SMEM((5, ROWS, n), dtype, transforms=tr),
            plgpu.SMEM((ROWS, n), dtype, transforms=tr),
            plgpu.Barrier(num_arrivals=len(pieces) + 2),
            plgpu.Barrier(num_arrivals=chunk, num_barriers=stages),
            plgpu.Barrier(num_arrivals=4),
        ],
        grid=(nq,),
        grid_names=("j",),
        **({} if interpret is None else {"interpret": interpret}),
    )


def gru_persistent_mosaic(
    xp: jax.Array,
    weights: Any,
    h0: jax.Array,
    *,
    chunk: int = CHUNK,
    stages: int = STAGES,
    spin_limit: int | None = SPIN_LIMIT,
    interpret: Any = None,
) -> jax.Array:
    """All GRU states from the input projections in ONE Mosaic GPU kernel (see the section
    comment above): weights resident in shared memory, programs meeting at a counter.

    Args:
      xp, weights, h0, chunk, stages, interpret: as in `gru_recurrence_mosaic`.
      spin_limit: polls (every thread an acquire load) after which a wait for the other
        programs gives up (then this function's result raises when read, and is NaN: never
        numbers). None: one thread spins on relaxed loads with no limit (cheaper, but a
        program that never arrives hangs the kernel; the probe of `persistent_unsupported`
        still runs with a limit first).

    Returns:
      (T, B, H) states h_1 .. h_T in the weights' dtype.

    Raises:
      ValueError: as `gru_recurrence_mosaic`, or when `persistent_unsupported` names a reason
        (compiling only); RuntimeError (when the result is read) if a wait gave up.
    """
    steps, batch, three_h = xp.shape
    hidden = weights.hidden
    if three_h != 3 * hidden:
        raise ValueError(f"xp has {three_h} features, expected 3·H = {3 * hidden}")
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 has shape {h0.shape}, expected {(batch, hidden)}")
    chunk = _min_chunk(chunk, batch, np.dtype(weights.dtype).itemsize)
    if interpret is None and (reason := persistent_unsupported(weights, batch, chunk=chunk,
                                                               stages=stages)):
        raise ValueError(f"gru_persistent_mosaic cannot run: {reason}")
    dtype = np.dtype(weights.dtype)
    if steps == 0:
        return jnp.zeros((0, batch, hidden), dtype)
    plan = _plan(weights, chunk)
    panels, _ = _resident_panels(plan)
    hq, n = plan.hq, batch_columns(batch)
    xpt = xp.astype(dtype).reshape(steps, batch, 3, hidden)
    xpt = jnp.pad(xpt, ((0, 0), (0, n - batch), (0, 0), (0, hq - hidden))).transpose(0, 2, 3, 1)
    h0t = jnp.pad(h0.astype(dtype), ((0, n - batch), (0, hq - hidden))).T
    bhn = jnp.broadcast_to(jnp.asarray(plan.b_hn)[:, None], (hq, n))
    kernel = _persistent_kernel(plan, panels.shape[1], n, dtype, stages, steps, spin_limit,
                                interpret)
    states, give_ups = kernel(xpt.reshape(steps * 3 * hq, n), h0t, bhn, jnp.asarray(panels),
                              jnp.asarray(plan.rows), jnp.asarray(plan.ptr))
    jax.debug.callback(_raise_if_gave_up, give_ups)
    states = jnp.where(jnp.sum(give_ups) == 0, states, jnp.asarray(jnp.nan, dtype))
    out = states[hq:].reshape(steps, hq, n)[:, :hidden, :batch]
    return out.transpose(0, 2, 1)


def _raise_if_gave_up(give_ups: Any) -> None:
    give_ups = np.asarray(give_ups)
    if give_ups.sum():
        raise RuntimeError(
            f"persistent Mosaic GPU kernel: {int(give_ups.sum())} waits of "
            f"{int((give_ups > 0).sum())} of its {give_ups.size} programs gave up: not all "
            "programs were resident at once, or spin_limit is too small. Its states are wrong "
            "(NaN); use impl='mosaic' or 'pallas'.")


def persistent_unsupported(weights: Any, batch: int, *, chunk: int = CHUNK,
                           stages: int = STAGES) -> str | None:
    """Why `gru_persistent_mosaic` cannot run here for these weights and batch, or None:
    `unsupported`'s checks, the resident panels' shared memory, and whether its programs
    can all be resident at once (at most 2 per multiprocessor: 128 threads of up to 255
    registers each)."""
    if reason := unsupported(weights, batch, chunk=chunk, stages=stages):
        return reason
    itemsize = np.dtype(weights.dtype).itemsize
    chunk = _min_chunk(chunk, batch, itemsize)
    plan = _plan(weights, chunk)
    _, max_chunks = _resident_panels(plan)
    need = persistent_smem_bytes(batch, max_chunks, chunk, stages, itemsize)
    if need > SMEM_LIMIT:
        return (f"its resident panels need {need} bytes of shared memory per program, more "
                f"than the {SMEM_LIMIT} a block may use: use impl='mosaic'")
    per_sm = min(2, (SMEM_LIMIT + 1024) // need)
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    if plan.hq // TILE > per_sm * sms:
        return (f"its {plan.hq // TILE} programs do not fit on {sms} multiprocessors at "
                f"{per_sm} per multiprocessor ({need} bytes of shared memory each): use "
                "impl='mosaic'")
    return _probe(weights, batch, chunk, stages)


def _probe(weights: Any, batch: int, chunk: int, stages: int) -> str | None:
    """Compiles the kernel for these weights and runs it on 2 steps of zeros: the reason it
    cannot launch, or that a wait gave up (its programs were not all resident), or None.
    Cached per weights object, batch and options (weights are built once per model)."""
    key = (id(weights), batch, chunk, stages)
    if key in _PROBES and _PROBES[key][0] is weights:
        return _PROBES[key][1]

    def run() -> str | None:
        plan = _plan(weights, chunk)
        panels, _ = _resident_panels(plan)
        n, nq = batch_columns(batch), plan.hq // TILE
        kernel = _persistent_kernel(plan, panels.shape[1], n, weights.dtype, stages, 2,
                                    SPIN_LIMIT, None)
        zeros = functools.partial(jnp.zeros, dtype=weights.dtype)
        try:
            _, give_ups = jax.jit(kernel)(zeros((2 * 3 * plan.hq, n)), zeros((plan.hq, n)),
                                          zeros((plan.hq, n)), jnp.asarray(panels),
                                          jnp.asarray(plan.rows), jnp.asarray(plan.ptr))
            give_ups = np.asarray(give_ups)
        except Exception as e:  # noqa: BLE001  (the reason is what the caller reports)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"
        if give_ups.sum():
            return (f"its {nq} programs are not all resident at once (a probe's waits gave "
                    f"up in {int((give_ups > 0).sum())} programs)")
        return None

    from bsrnn.kernels import autotune  # the package imports this module's neighbours

    _PROBES[key] = (weights, autotune.outside_traces(run))
    return _PROBES[key][1]


_PROBES: dict[tuple[int, int, int, int], tuple[Any, str | None]] = {}
