"""Pallas (Triton) kernels for a whole GRU sequence with block-sparse recurrent weights.

Both kernels compute, for t = 0..T-1 and the PyTorch/cuDNN GRU (gate order r, z, n),

    a = h_t @ W_h                                  (B, 3·Hp), W_h block-sparse
    r = σ(xp_t[:, r] + a_r),  z = σ(xp_t[:, z] + a_z)
    n = tanh(xp_t[:, n] + r ⊙ (a_n + b_hn)),       h_{t+1} = (1 − z) ⊙ n + z ⊙ h_t

where xp = x @ W_i + b_i (+ b_hr, b_hz folded in) was computed for all steps beforehand.
W_h holds the three gate kernels side by side, each padded to Hp = ceil(H / bw)·bw columns,
so block column j of gate g is block column g·(Hp / bw) + j and no block straddles gates.

State lives in one buffer `hbuf` of shape ((T + 1)·B, H): rows t·B .. t·B + B − 1 hold h_t
(h_0 first). A step reads rows of h_t and writes those of h_{t+1}, in place (the buffer is
aliased from input to output), so a step is exactly one kernel launch: no slicing of xp,
no stacking of outputs, no scalar arithmetic between launches.

- `step`: one launch per time step. Program (j, i) owns output columns j·bw .. j·bw + bw − 1
  of batch tile i: it walks the three block columns of its tile (the r, z and n panels),
  gathering the matching bh-wide slices of h_t, accumulates in float32, applies the gate
  math and stores its (TM, bw) tile of h_{t+1}. The step index comes from a one-element
  counter that each launch reads and passes on incremented (a fresh output), so the same
  compiled kernel serves every step and the caller can run it inside `lax.scan(...,
  unroll=U)`.
- `persistent`: one launch for all T steps. Each program loops over the steps and meets the
  others at a grid-wide barrier (an atomic counter in device memory) between steps. It
  needs every program resident at once, so the grid is capped at `max_programs` (default:
  the number of multiprocessors), each program taking several block columns if needed.
  With `hold=True` a program loads its weight panels once, before the time loop, and keeps
  them in registers across steps; otherwise it re-reads them every step (from L2, where
  3.9 MB of a 90%-sparse GRU 2560 stays resident). A barrier that waits longer than
  `spin_limit` polls gives up (counted in the returned sync word) rather than hang.

Weights come in one of two layouts (see `bsrnn.kernels.recurrence.SparseGRUWeights`):
"bsc" (the `BlockSparseMatrix` panels, walked with a data-dependent trip count) or "ell"
(each block column padded to the same K panel rows, a power of two, with a feature index
per panel row: fixed trip counts, which Triton pipelines, at the price of the padding).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bsrnn import cells
from bsrnn.kernels.bsc import BlockSparseMatrix
from bsrnn.kernels.pallas_gpu import (
    acc_init,
    acc_result,
    accumulate,
    column_walk,
    launch_config,
)

Layout = Literal["bsc", "ell"]
Compute = Literal["fma", "dot"]

def _launch_config(batch, bw, dtype, compute, rows_per_step, max_tm, k_ell):
    """`pallas_gpu.launch_config` (the one set of launch defaults), panel rows per step
    capped at the ell width K."""
    compute, tm, bw_pad, rows = launch_config(batch, bw, dtype, compute, rows_per_step, max_tm)
    return compute, tm, bw_pad, rows if k_ell is None else min(rows, k_ell)


class _Cfg:
    """Static launch description shared by the kernel bodies."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _gate_acc(cfg, w_refs, hbuf_ref, h_rows, m_ok, c_ok, jj, hold=None):
    """float32 (tm, bw_pad) accumulator of h_t @ (block column jj of W_h)."""
    c = jnp.arange(cfg.bw_pad, dtype=jnp.int32)
    rows_per_step = cfg.rows_per_step

    def gather(feat, ok):
        return plgpu.load(hbuf_ref.at[h_rows[:, None], feat[None, :]],
                          mask=m_ok[:, None] & ok[None, :], other=0, volatile=cfg.h_volatile)

    if cfg.layout == "bsc":
        col_ptr_ref, row_idx_ref, panel_ref = w_refs
        return column_walk(col_ptr_ref[jj] * cfg.bh, col_ptr_ref[jj + 1] * cfg.bh, row_idx_ref,
                           panel_ref, gather, bh=cfg.bh, bw=cfg.bw, bw_pad=cfg.bw_pad,
                           n_in=cfg.hidden, tm=cfg.tm, rows_per_step=rows_per_step,
                           compute=cfg.compute, dtype=cfg.dtype, precision=cfg.precision)
    everywhere = jnp.ones((rows_per_step,), bool)  # ell padding: feature 0, zero weights
    acc = acc_init(cfg.compute, cfg.tm, rows_per_step, cfg.bw_pad)
    if hold is not None:  # "ell" chunks (features (R,), panel (R, bw_pad)) in registers
        for feat, wv in hold:  # straight-line code: every chunk's gather can be in flight
            acc = accumulate(acc, gather(feat, everywhere).astype(cfg.dtype), wv, cfg.compute,
                             cfg.precision)
        return acc_result(acc, cfg.compute)
    feat_ref, panel_ref = w_refs
    start = jj * cfg.k_ell

    def step(i, acc):
        r = start + i * rows_per_step + jnp.arange(rows_per_step, dtype=jnp.int32)
        feat = plgpu.load(feat_ref.at[r])
        wv = plgpu.load(panel_ref.at[r[:, None], c[None, :]], mask=c_ok[None, :], other=0)
        return accumulate(acc, gather(feat, everywhere).astype(cfg.dtype),
                          wv.astype(cfg.dtype), cfg.compute, cfg.precision)

    acc = jax.lax.fori_loop(0, cfg.k_ell // rows_per_step, step, acc)
    return acc_result(acc, cfg.compute)


class _Tile:
    """Index vectors of the (tm, bw_pad) output tile of gate block column q_col."""

    def __init__(self, cfg, q_col):
        self.m = pl.program_id(1) * cfg.tm + jnp.arange(cfg.tm, dtype=jnp.int32)
        self.m_ok = self.m < cfg.batch
        c = jnp.arange(cfg.bw_pad, dtype=jnp.int32)
        self.c_ok = c < cfg.bw
        self.col = q_col * cfg.bw + c
        self.col_ok = self.c_ok & (self.col < cfg.hidden)
        self.ok = self.m_ok[:, None] & self.col_ok[None, :]
        self.q_col = q_col

    def load(self, ref, t, cfg, col_offset=0, volatile=False):
        rows = t * cfg.batch + self.m
        return plgpu.load(ref.at[rows[:, None], (self.col + col_offset)[None, :]],
                          mask=self.ok, other=0, volatile=volatile).astype(jnp.float32)

    def load_x(self, xp_ref, t, cfg):
        """The (x_r, x_z, x_n) tiles of step t, float32."""
        return tuple(self.load(xp_ref, t, cfg, g * cfg.hidden) for g in range(3))

    def accs(self, cfg, w_refs, hbuf_ref, t, holds=None):
        h_rows = t * cfg.batch + self.m
        return [_gate_acc(cfg, w_refs, hbuf_ref, h_rows, self.m_ok, self.c_ok,
                          g * cfg.nbc_g + self.q_col, None if holds is None else holds[g])
                for g in range(3)]

    def store(self, ref, t, cfg, h):
        rows = t * cfg.batch + self.m
        plgpu.store(ref.at[rows[:, None], self.col[None, :]], h.astype(ref.dtype),
                    mask=self.ok)


def _gru_gates(x, accs, h_old, b_hn):
    """h_{t+1} (float32) of a tile, from its input tiles x = (x_r, x_z, x_n), the three
    recurrent accumulators, h_t and b_hn (bw_pad,): `bsrnn.cells.gru_gates` traced here."""
    return cells.gru_gates(*x, accs[0], accs[1], accs[2] + b_hn[None, :], h_old)


def _load_holds(cfg, w_refs, q_col):
    """Per gate, the "ell" panel of gate block column q_col as K / R chunks of
    (features (R,), weights (R, bw_pad)), loaded once."""
    feat_ref, panel_ref = w_refs
    k = jnp.arange(cfg.rows_per_step, dtype=jnp.int32)
    c = jnp.arange(cfg.bw_pad, dtype=jnp.int32)
    holds = []
    for g in range(3):
        chunks = []
        for i in range(cfg.k_ell // cfg.rows_per_step):
            r = (g * cfg.nbc_g + q_col) * cfg.k_ell + i * cfg.rows_per_step + k
            wv = plgpu.load(panel_ref.at[r[:, None], c[None, :]], mask=(c < cfg.bw)[None, :],
                            other=0)
            chunks.append((plgpu.load(feat_ref.at[r]), wv.astype(cfg.dtype)))
        holds.append(chunks)
    return holds


def _step_kernel(cnt_ref, *refs, cfg):
    n_w = 3 if cfg.layout == "bsc" else 2
    w_refs, (xp_ref, bhn_ref, hbuf_ref, out_ref, cnt_out_ref) = refs[:n_w], refs[n_w:]
    t = cnt_ref[0]
    tile = _Tile(cfg, pl.program_id(0))
    holds = _load_holds(cfg, w_refs, tile.q_col) if cfg.hold else None
    accs = tile.accs(cfg, w_refs, hbuf_ref, t, holds)
    b_hn = plgpu.load(bhn_ref.at[tile.col], mask=tile.col_ok, other=0).astype(jnp.float32)
    h_new = _gru_gates(tile.load_x(xp_ref, t, cfg), accs, tile.load(hbuf_ref, t, cfg), b_hn)
    tile.store(out_ref, t + 1, cfg, h_new)
    cnt_out_ref[0] = t + 1  # every program writes the same value


def _grid_barrier(sync_ref, target, spin_limit, interpret):
    """Waits until sync_ref[0] (bumped once per program per step) reaches `target`."""
    zero, one = jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32)  # (interpret-safe)
    cta_barrier = (lambda: None) if interpret else plgpu.debug_barrier  # none in interpreter
    cta_barrier()  # this program's stores are issued before its release
    plgpu.atomic_add(sync_ref, zero, one)  # acq_rel, gpu scope

    def cond(carry):
        value, polls = carry
        return (value < target) & (polls < spin_limit)

    def body(carry):
        return plgpu.load(sync_ref.at[zero], volatile=True), carry[1] + 1

    _, polls = jax.lax.while_loop(
        cond, body, (plgpu.load(sync_ref.at[zero], volatile=True), zero))
    plgpu.atomic_add(sync_ref, one, (polls >= spin_limit).astype(jnp.int32))  # acquire
    cta_barrier()


def _persistent_kernel(*refs, cfg):
    n_w = 3 if cfg.layout == "bsc" else 2
    w_refs = refs[:n_w]
    xp_ref, bhn_ref, _hbuf_in, _sync_in, hbuf_ref, sync_ref = refs[n_w:]
    n_programs = pl.num_programs(0) * pl.num_programs(1)
    # A program past the last column (clamped) recomputes a real tile: same values stored.
    tiles = [_Tile(cfg, jnp.minimum(pl.program_id(0) * cfg.cols_per_program + q,
                                    cfg.nbc_g - 1))
             for q in range(cfg.cols_per_program)]
    holds = [_load_holds(cfg, w_refs, tile.q_col) if cfg.hold else None for tile in tiles]
    b_hns = [plgpu.load(bhn_ref.at[tile.col], mask=tile.col_ok, other=0).astype(jnp.float32)
             for tile in tiles]
    # Carried per tile: this step's input tiles (prefetched before the previous barrier)
    # and the tile's own h_t (it wrote it itself), so after a barrier only the gathers of
    # other programs' h_t wait on memory.
    carry0 = tuple((tile.load_x(xp_ref, 0, cfg), tile.load(hbuf_ref, 0, cfg))
                   for tile in tiles)

    def step(t, carry):
        new_carry = []
        for tile, hold, b_hn, (x, h_old) in zip(tiles, holds, b_hns, carry, strict=True):
            h_new = _gru_gates(x, tile.accs(cfg, w_refs, hbuf_ref, t, hold), h_old, b_hn)
            tile.store(hbuf_ref, t + 1, cfg, h_new)
            new_carry.append((h_new.astype(cfg.dtype).astype(jnp.float32), tile))  # as stored
        # Next step's input tiles do not depend on h: their loads are issued before the
        # barrier and land while it waits.
        t_next = jnp.minimum(t + 1, cfg.steps - 1)
        new_carry = tuple((tile.load_x(xp_ref, t_next, cfg), h) for h, tile in new_carry)
        _grid_barrier(sync_ref, (t + 1) * n_programs, cfg.spin_limit, cfg.interpret)
        return new_carry

    jax.lax.fori_loop(0, cfg.steps, step, carry0)


def _weights_args(layout, w_h, ell):
    if layout == "bsc":
        (bh, bw), values = w_h.block_shape, jnp.asarray(w_h.values)
        row_idx = jnp.asarray(w_h.row_indices)
        if w_h.nnzb == 0:  # no block at all: one zero block that no column points at
            values, row_idx = jnp.zeros((1, bh, bw), values.dtype), jnp.zeros((1,), jnp.int32)
        return jnp.asarray(w_h.col_ptr), row_idx, values.reshape(-1, bw)
    feat, values = ell
    return feat.reshape(-1), values.reshape(-1, values.shape[-1])


def _common_cfg(xp, w_h, ell, hidden, layout, compute, rows_per_step, max_tm, hold):
    steps, batch, three_h = xp.shape
    if three_h != 3 * hidden:
        raise ValueError(f"xp has {three_h} features, expected 3·H = {3 * hidden}")
    (bh, bw), (_, nbc) = w_h.block_shape, w_h.grid_shape
    if nbc % 3:
        raise ValueError(f"W_h has {nbc} block columns, not three gates' worth")
    dtype = jnp.result_type(xp.dtype, w_h.values.dtype)
    if layout not in ("bsc", "ell"):
        raise ValueError(f'layout must be "bsc" or "ell", got {layout!r}')
    if layout == "ell" and ell is None:
        raise ValueError('layout="ell" needs weights built with ell=True')
    k_ell = None if layout == "bsc" else ell[0].shape[-1]
    compute, tm, bw_pad, rows = _launch_config(batch, bw, dtype, compute, rows_per_step,
                                               max_tm, k_ell)
    if hold and layout != "ell":
        raise ValueError('hold=True needs layout="ell"')
    return dict(
        steps=steps, batch=batch, hidden=hidden, bh=bh, bw=bw, bw_pad=bw_pad, nbc_g=nbc // 3,
        tm=tm, rows_per_step=rows, compute=compute, layout=layout, k_ell=k_ell, dtype=dtype,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None, hold=hold,
    )


def gru_step_pallas(
    hbuf: jax.Array,
    cnt: jax.Array,
    xp: jax.Array,
    w_h,
    b_hn: jax.Array,
    *,
    hidden: int,
    ell: tuple[jax.Array, jax.Array] | None = None,
    layout: Layout = "bsc",
    hold: bool = False,
    compute: Compute | None = None,
    rows_per_step: int | None = None,
    max_tm: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One fused GRU step: h_{t+1} rows of `hbuf` from its h_t rows, t = cnt[0].

    Args:
      hbuf: ((T + 1)·B, H) state buffer (h_0 in rows 0..B-1), updated in place.
      cnt: (1,) int32 step index t.
      xp: (T, B, 3·H) input projections (biases b_i, b_hr, b_hz included).
      w_h: `BlockSparseMatrix` (H, 3·Hp), the gate-padded recurrent kernel.
      b_hn: (H,) recurrent bias of the n gate.
      hidden: H.
      ell: (feat (3·Hp/bw, K), values (3·Hp/bw, K, bw)) for layout="ell".
      hold: (layout "ell") load each gate's whole K-row panel up front, in chunks of
        rows_per_step rows, with no loop (all loads in flight at once).
      layout, compute, rows_per_step, max_tm, num_warps, num_stages: launch choices (module
        docstring); defaults: "fma" for B <= 4 else "dot", 4 warps, 3 stages for "dot".
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      (hbuf with h_{t+1} written, (1,) int32 t + 1).
    """
    cfg = _Cfg(**_common_cfg(xp, w_h, ell, hidden, layout, compute, rows_per_step, max_tm,
                             hold), h_volatile=False)
    w_args = _weights_args(layout, w_h, ell)
    n_in = 1 + len(w_args) + 2  # index of hbuf
    return pl.pallas_call(
        functools.partial(_step_kernel, cfg=cfg),
        out_shape=(jax.ShapeDtypeStruct(hbuf.shape, hbuf.dtype),
                   jax.ShapeDtypeStruct((1,), jnp.int32)),
        grid=(cfg.nbc_g, pl.cdiv(cfg.batch, cfg.tm)),
        input_output_aliases={n_in: 0},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or 4,
            num_stages=num_stages or (3 if cfg.compute == "dot" else 1)),
        name=f"gru_step_{cfg.bh}x{cfg.bw}",
    )(cnt, *w_args, xp.reshape(-1, 3 * hidden), b_hn, hbuf)


def _persistent_grid(common: dict, max_programs: int | None) -> tuple[int, int, int]:
    """(block columns per program, column programs, batch tiles) of the persistent grid."""
    if max_programs is None:
        max_programs = getattr(jax.devices()[0], "core_count", None) or 108
    n_btiles = pl.cdiv(common["batch"], common["tm"])
    per_tile = max(1, max_programs // n_btiles)
    cols_per_program = pl.cdiv(common["nbc_g"], per_tile)
    n_col_programs = pl.cdiv(common["nbc_g"], cols_per_program)
    if n_col_programs * n_btiles > max_programs:
        raise ValueError(
            f"persistent kernel needs {n_btiles} batch tiles x >= 1 column programs, more "
            f"than max_programs={max_programs} (all must be resident at once); use the "
            "step kernel")
    return cols_per_program, n_col_programs, n_btiles


def _option(options: dict, name: str, default):
    value = options.get(name)
    return default if value is None else value


def persistent_programs(xp_shape: tuple[int, int, int], w_h, ell, **options) -> int:
    """How many programs `gru_persistent_pallas` launches for these shapes and options
    (the sync word counts T of them per completed run)."""
    steps, batch, three_h = xp_shape
    xp = jax.ShapeDtypeStruct((steps, batch, three_h), w_h.values.dtype)
    common = _common_cfg(xp, w_h, ell, three_h // 3, _option(options, "layout", "ell"),
                         options.get("compute"), options.get("rows_per_step"),
                         _option(options, "max_tm", 32), _option(options, "hold", True))
    _, n_col_programs, n_btiles = _persistent_grid(common, options.get("max_programs"))
    return n_col_programs * n_btiles


def _raise_if_barrier_failed(sync, expected) -> None:
    sync = np.asarray(sync)
    if int(sync[1]) or int(sync[0]) != int(expected):
        raise RuntimeError(
            f"persistent GRU kernel: {int(sync[1])} grid-barrier waits gave up (sync counter "
            f"{int(sync[0])}, expected {int(expected)}): not all programs were resident at "
            "once, or spin_limit is too small. Its states are wrong; use impl='pallas'.")


def checked_persistent_output(hbuf: jax.Array, sync: jax.Array, steps: int,
                              programs: int) -> jax.Array:
    """`hbuf` from `gru_persistent_pallas` once its sync word says every barrier completed.

    When one gave up, reading the result raises (a host callback in the graph: the error
    surfaces when the result is used), and the states are NaN in any case, never numbers.
    """
    expected = steps * programs
    jax.debug.callback(_raise_if_barrier_failed, sync, expected)
    ok = (sync[0] == expected) & (sync[1] == 0)
    return jnp.where(ok, hbuf, jnp.asarray(jnp.nan, hbuf.dtype))


@functools.lru_cache(maxsize=256)
def _probe(batch, three_h, dtype_name, w_h_meta, ell_meta, options) -> str | None:
    hidden = three_h // 3
    dtype = jnp.dtype(dtype_name)
    shape, block_shape, nnzb, ncol = w_h_meta
    with jax.ensure_compile_time_eval():
        w_h = BlockSparseMatrix(jnp.zeros((max(nnzb, 1), *block_shape), dtype),
                                jnp.zeros((max(nnzb, 1),), jnp.int32),
                                jnp.zeros((ncol + 1,), jnp.int32), shape, block_shape)
        ell = None if ell_meta is None else (jnp.zeros(ell_meta[:2], jnp.int32),
                                             jnp.zeros(ell_meta, dtype))
        steps = 2
        opts = dict(options)
        try:
            programs = persistent_programs((steps, batch, three_h), w_h, ell, **opts)
            hbuf = jnp.zeros(((steps + 1) * batch, hidden), dtype)
            xp = jnp.zeros((steps, batch, three_h), dtype)
            run = jax.jit(functools.partial(gru_persistent_pallas, hidden=hidden, **opts))
            _, sync = run(hbuf, xp, w_h, jnp.zeros((hidden,), dtype), ell=ell)
            sync = np.asarray(sync)
        except Exception as e:  # noqa: BLE001  (the reason is what the caller reports)
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            limit = next((ln for ln in lines if "RESOURCE" in ln or "limit" in ln.lower()
                          or "resources" in ln), lines[0] if lines else type(e).__name__)
            return f"{type(e).__name__}: {limit.strip()[:300]}"
    if sync[1] or sync[0] != steps * programs:
        return (f"its {programs} programs are not all resident at once (a probe's barrier "
                f"gave up: sync {sync.tolist()})")
    return None


def persistent_unsupported(xp_shape: tuple[int, int, int], dtype, w_h, ell,
                           **options) -> str | None:
    """Why `gru_persistent_pallas` cannot run these shapes on this GPU, or None if it can.

    Checked before launch by compiling and running the kernel on two steps of zeros with
    the same static shapes and options (cached per shape): a compile that exceeds the
    shared-memory limit, a launch out of registers, or programs that are not all resident
    at once (the probe's barrier gives up) each give their reason. None with
    ``interpret=True``.
    """
    if options.pop("interpret", False):
        return None  # the interpreter has no resource limits
    _, batch, three_h = xp_shape
    w_h_meta = (tuple(w_h.shape), tuple(w_h.block_shape), int(w_h.nnzb),
                int(w_h.grid_shape[1]))
    ell_meta = None if ell is None else tuple(int(d) for d in ell[1].shape)
    opts = tuple(sorted(options.items()))
    return _probe(int(batch), int(three_h), jnp.dtype(dtype).name, w_h_meta, ell_meta, opts)


def gru_persistent_pallas(
    hbuf: jax.Array,
    xp: jax.Array,
    w_h,
    b_hn: jax.Array,
    *,
    hidden: int,
    ell: tuple[jax.Array, jax.Array] | None = None,
    layout: Layout = "ell",
    hold: bool = True,
    compute: Compute | None = None,
    rows_per_step: int | None = None,
    max_tm: int = 32,
    max_programs: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    spin_limit: int = 1 << 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """All T GRU steps in one launch (GPU only: programs meet at a grid-wide barrier).

    Args:
      hbuf: ((T + 1)·B, H) state buffer with h_0 in rows 0..B-1; rows of h_1..h_T are
        written.
      xp, w_h, b_hn, hidden, ell, layout, compute, rows_per_step, max_tm, num_warps,
        num_stages: as in `gru_step_pallas`.
      hold: keep each program's weight panels in registers across steps (layout "ell";
        the whole padded panel is one tile, so K·bw must stay small).
      max_programs: most programs launched (all must be resident at once); default the
        device's multiprocessor count.
      num_warps: default 8 (held panels spread over more registers).
      spin_limit: polls after which a barrier wait gives up (then results are wrong and
        the second sync word counts the give-ups).
      interpret: run in the Pallas interpreter, which runs programs one after another: with
        max_programs=1 it tests everything but the barrier; with more, the first program's
        barrier waits give up (a forced barrier failure).

    Returns:
      (hbuf, sync): sync (2,) int32 = (T · programs when every barrier completed, number of
      barrier waits that gave up).
    """
    common = _common_cfg(xp, w_h, ell, hidden, layout, compute, rows_per_step, max_tm, hold)
    cols_per_program, n_col_programs, n_btiles = _persistent_grid(common, max_programs)
    cfg = _Cfg(**common, cols_per_program=cols_per_program, spin_limit=spin_limit,
               h_volatile=True,  # other programs' writes: bypass the (incoherent) L1
               interpret=interpret)
    w_args = _weights_args(layout, w_h, ell)
    n_in = len(w_args) + 2  # index of hbuf
    return pl.pallas_call(
        functools.partial(_persistent_kernel, cfg=cfg),
        out_shape=(jax.ShapeDtypeStruct(hbuf.shape, hbuf.dtype),
                   jax.ShapeDtypeStruct((2,), jnp.int32)),
        grid=(n_col_programs, n_btiles),
        input_output_aliases={n_in: 0, n_in + 1: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or 8,
            num_stages=num_stages or (3 if cfg.compute == "dot" else 1)),
        name=f"gru_persistent_{cfg.bh}x{cfg.bw}",
    )(*w_args, xp.reshape(-1, 3 * hidden), b_hn, hbuf, jnp.zeros((2,), jnp.int32))
