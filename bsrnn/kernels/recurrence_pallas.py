"""Pallas (Triton) kernels for whole RNN, GRU and LSTM sequences with block-sparse
recurrent weights.

The step kernel serves every cell: with G gates (1 for the vanilla RNN, 3 for the GRU, 4 for
the LSTM) it computes, for t = 0..T-1,

    a = h_t @ W_h                                  (B, G·Hp), W_h block-sparse
    then the cell's update from xp_t and a (`bsrnn.cells`, traced on each tile):
      rnn, rnn_clipped_relu: h_{t+1} = act(xp_t + a)                    (`rnn_activation`)
      gru (r, z, n):  r = σ(xp_r + a_r), z = σ(xp_z + a_z),
                      n = tanh(xp_n + r ⊙ (a_n + b_hn)), h_{t+1} = (1 − z) ⊙ n + z ⊙ h_t
                                                                         (`gru_gates`)
      lstm (i, f, g, o): c_{t+1} = σ(f) ⊙ c_t + σ(i) ⊙ tanh(g), h_{t+1} = σ(o) ⊙ tanh(c_{t+1})
                         on the pre-activations xp_· + a_·                (`lstm_gates`)

where xp = x @ W_i + b (all biases but the GRU's b_hn folded in) was computed for all steps
beforehand. W_h holds the G gate kernels side by side, each padded to Hp = ceil(H / bw)·bw
columns, so block column j of gate g is block column g·(Hp / bw) + j and no block straddles
gates.

State lives in one buffer `hbuf` of shape ((T + 1)·B, S·H), S = 2 for the LSTM (columns
[h | c]), else 1: rows t·B .. t·B + B − 1 hold step t's state (the initial one first). A
step reads rows of step t and writes those of step t + 1, in place (the buffer is aliased
from input to output), so a step is exactly one kernel launch: no slicing of xp, no
stacking of outputs, no scalar arithmetic between launches. The LSTM's c rides in the same
rows as its h, so every cell has the same kernel signature, grid and aliasing.

- `step` (`cell_step_pallas`): one launch per time step. Program (j, i) owns output columns
  j·bw .. j·bw + bw − 1 of batch tile i: it walks the G block columns of its tile (one
  panel per gate), gathering the matching bh-wide slices of h_t, accumulates in float32,
  applies the gate math and stores its (TM, bw) tile of h_{t+1} (and of c_{t+1}). The step
  index comes from a one-element counter that each launch reads and passes on incremented
  (a fresh output), so the same compiled kernel serves every step and the caller can run it
  inside `lax.scan(..., unroll=U)`.
- `persistent` (`gru_persistent_pallas`, GRU only): one launch for all T steps. Each
  program loops over the steps and meets the others at a grid-wide barrier (an atomic
  counter in device memory) between steps. It needs every program resident at once, so the
  grid is capped at `max_programs` (default: the number of multiprocessors), each program
  taking several block columns if needed. With `hold=True` a program loads its weight
  panels once, before the time loop, and keeps them in registers across steps; otherwise
  it re-reads them every step (from L2, where 3.9 MB of a 90%-sparse GRU 2560 stays
  resident). A barrier that waits longer than `spin_limit` polls gives up (counted in the
  returned sync word) rather than hang.

Weights come in one of two layouts (see `bsrnn.kernels.recurrence.SparseGRUWeights`):
"bsc" (the `BlockSparseMatrix` panels, walked with a data-dependent trip count) or "ell"
(each block column padded to the same K panel rows, a power of two, with a feature index
per panel row: fixed trip counts, which Triton pipelines, at the price of the padding).
Only GRU weights carry the "ell" arrays today; LSTM and RNN layers run "bsc".
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
from bsrnn.kernels import autotune
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
        """The G gates' input tiles of step t ((x_r, x_z, x_n) for the GRU), float32."""
        return tuple(self.load(xp_ref, t, cfg, g * cfg.hidden) for g in range(cfg.gates))

    def accs(self, cfg, w_refs, hbuf_ref, t, holds=None):
        h_rows = t * cfg.batch + self.m
        return [_gate_acc(cfg, w_refs, hbuf_ref, h_rows, self.m_ok, self.c_ok,
                          g * cfg.nbc_g + self.q_col, None if holds is None else holds[g])
                for g in range(cfg.gates)]

    def store(self, ref, t, cfg, h, col_offset=0):
        rows = t * cfg.batch + self.m
        plgpu.store(ref.at[rows[:, None], (self.col + col_offset)[None, :]],
                    h.astype(ref.dtype), mask=self.ok)


def _cell_gates(cell, x, accs, old, b_hn):
    """A tile's new state parts, float32: (h_{t+1},), or (h_{t+1}, c_{t+1}) for the LSTM.

    Args:
      cell: the layer's cell (`bsrnn.cells.GATES`).
      x: the gates' input tiles (`_Tile.load_x`); accs: their recurrent accumulators.
      old: part -> that part of the tile's old state (0: h_t, 1: the LSTM's c_t), called
        only for the parts the cell reads (the RNN reads none).
      b_hn: (bw_pad,) the GRU's recurrent n-gate bias (None for the other cells).

    `bsrnn.cells.gru_gates`, `lstm_gates` and `rnn_activation` are traced here.
    """
    if cell == "gru":
        return (cells.gru_gates(*x, accs[0], accs[1], accs[2] + b_hn[None, :], old(0)),)
    pre = [xg + a for xg, a in zip(x, accs, strict=True)]
    if cell == "lstm":
        return cells.lstm_gates(*pre, old(1))
    return (cells.rnn_activation(cell, pre[0]),)


def _load_holds(cfg, w_refs, q_col):
    """Per gate, the "ell" panel of gate block column q_col as K / R chunks of
    (features (R,), weights (R, bw_pad)), loaded once."""
    feat_ref, panel_ref = w_refs
    k = jnp.arange(cfg.rows_per_step, dtype=jnp.int32)
    c = jnp.arange(cfg.bw_pad, dtype=jnp.int32)
    holds = []
    for g in range(cfg.gates):
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
    w_refs, (xp_ref, *bhn_ref, hbuf_ref, out_ref, cnt_out_ref) = refs[:n_w], refs[n_w:]
    t = cnt_ref[0]
    tile = _Tile(cfg, pl.program_id(0))
    holds = _load_holds(cfg, w_refs, tile.q_col) if cfg.hold else None
    accs = tile.accs(cfg, w_refs, hbuf_ref, t, holds)
    b_hn = None
    if bhn_ref:  # the GRU's b_hn (the other cells have every bias in xp)
        b_hn = plgpu.load(bhn_ref[0].at[tile.col], mask=tile.col_ok,
                          other=0).astype(jnp.float32)
    new = _cell_gates(cfg.cell, tile.load_x(xp_ref, t, cfg), accs,
                      lambda part: tile.load(hbuf_ref, t, cfg, part * cfg.hidden), b_hn)
    for part, value in enumerate(new):  # h, then the LSTM's c in columns H..2H-1
        tile.store(out_ref, t + 1, cfg, value, part * cfg.hidden)
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
            (h_new,) = _cell_gates("gru", x, tile.accs(cfg, w_refs, hbuf_ref, t, hold),
                                   lambda part, h=h_old: h, b_hn)
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


def _common_cfg(xp, w_h, ell, hidden, layout, compute, rows_per_step, max_tm, hold,
                cell="gru"):
    if cell not in cells.GATES:
        raise ValueError(f"cell must be one of {tuple(cells.GATES)}, got {cell!r}")
    gates = len(cells.GATES[cell])
    steps, batch, features = xp.shape
    if features != gates * hidden:
        raise ValueError(f"xp has {features} features, expected {gates}·H = {gates * hidden} "
                         f"for a {cell} layer")
    (bh, bw), (_, nbc) = w_h.block_shape, w_h.grid_shape
    if nbc % gates:
        raise ValueError(f"W_h has {nbc} block columns, not {gates} gates' worth ({cell})")
    dtype = jnp.result_type(xp.dtype, w_h.values.dtype)
    if layout not in ("bsc", "ell"):
        raise ValueError(f'layout must be "bsc" or "ell", got {layout!r}')
    if layout == "ell" and ell is None:
        raise ValueError('layout="ell" needs the fixed-width panels: GRU weights built with '
                         'ell=True (LSTM and RNN weights have none: use layout="bsc")')
    k_ell = None if layout == "bsc" else ell[0].shape[-1]
    compute, tm, bw_pad, rows = _launch_config(batch, bw, dtype, compute, rows_per_step,
                                               max_tm, k_ell)
    if hold and layout != "ell":
        raise ValueError('hold=True needs layout="ell"')
    return dict(
        cell=cell, gates=gates, parts=2 if cell == "lstm" else 1,
        steps=steps, batch=batch, hidden=hidden, bh=bh, bw=bw, bw_pad=bw_pad,
        nbc_g=nbc // gates,
        tm=tm, rows_per_step=rows, compute=compute, layout=layout, k_ell=k_ell, dtype=dtype,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None, hold=hold,
    )


def cell_step_pallas(
    hbuf: jax.Array,
    cnt: jax.Array,
    xp: jax.Array,
    w_h,
    b_hn: jax.Array | None = None,
    *,
    cell: str = "gru",
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
    """One fused step of a `cell` layer: the step-(t + 1) rows of `hbuf` from its step-t
    rows, t = cnt[0].

    Args:
      hbuf: ((T + 1)·B, S·H) state buffer, S = 2 for the LSTM (columns [h | c]), else 1;
        the initial state in rows 0..B-1. Updated in place.
      cnt: (1,) int32 step index t.
      xp: (T, B, G·H) input projections, G = the cell's gates (1, 3 or 4), with every bias
        folded in but the GRU's b_hn.
      w_h: `BlockSparseMatrix` (H, G·Hp), the gate-padded recurrent kernel.
      b_hn: (H,) recurrent bias of the GRU's n gate; None for the other cells.
      cell: "gru", "lstm", "rnn" or "rnn_clipped_relu" (`bsrnn.cells.GATES`).
      hidden: H.
      ell: (feat (G·Hp/bw, K), values (G·Hp/bw, K, bw)) for layout="ell".
      hold: (layout "ell") load each gate's whole K-row panel up front, in chunks of
        rows_per_step rows, with no loop (all loads in flight at once).
      layout, compute, rows_per_step, max_tm, num_warps, num_stages: launch choices (module
        docstring); defaults: "fma" for B <= 4 else "dot", 4 warps, 3 stages for "dot".
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      (hbuf with step t + 1 written, (1,) int32 t + 1).
    """
    cfg = _Cfg(**_common_cfg(xp, w_h, ell, hidden, layout, compute, rows_per_step, max_tm,
                             hold, cell), h_volatile=False)
    if hbuf.shape != ((cfg.steps + 1) * cfg.batch, cfg.parts * hidden):
        raise ValueError(f"hbuf has shape {hbuf.shape}, expected ((T + 1)·B, "
                         f"{'2·H' if cfg.parts == 2 else 'H'}) = "
                         f"{((cfg.steps + 1) * cfg.batch, cfg.parts * hidden)} for a {cell} "
                         f"layer of T={cfg.steps}, B={cfg.batch}, H={hidden}")
    if (b_hn is None) != (cell != "gru"):
        raise ValueError(f"b_hn is the GRU's n-gate bias: pass it for a GRU and only then "
                         f"(cell {cell!r}, got {'None' if b_hn is None else 'an array'})")
    w_args = _weights_args(layout, w_h, ell)
    biases = () if b_hn is None else (b_hn,)
    n_in = 1 + len(w_args) + 1 + len(biases)  # index of hbuf
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
        name=f"{cell}_step_{cfg.bh}x{cfg.bw}",
    )(cnt, *w_args, xp.reshape(-1, cfg.gates * hidden), *biases, hbuf)


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
    steps = 2

    def run_probe() -> str | None:
        w_h = BlockSparseMatrix(jnp.zeros((max(nnzb, 1), *block_shape), dtype),
                                jnp.zeros((max(nnzb, 1),), jnp.int32),
                                jnp.zeros((ncol + 1,), jnp.int32), shape, block_shape)
        ell = None if ell_meta is None else (jnp.zeros(ell_meta[:2], jnp.int32),
                                             jnp.zeros(ell_meta, dtype))
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
            return (f"its {programs} programs are not all resident at once (a probe's "
                    f"barrier gave up: sync {sync.tolist()})")
        return None

    return autotune.outside_traces(run_probe)


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
        num_stages: as in `cell_step_pallas` (cell "gru": this kernel has no LSTM or RNN
        form).
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
