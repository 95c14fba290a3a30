"""Data-parallel training over a device mesh, and multi-host start-up.

One mesh axis, ``data``, of ``config.mesh.data`` devices (-1: every device of every
process). :mod:`bsrnn.train` jits its step with these shardings (``jax.jit`` and
``NamedSharding``, no ``pmap``):

* **Sharded over ``data``** (leading axis split in equal parts): every batch array, (B, ...),
  and a language model's recurrent carry, (B, H) per layer, because row b's carry belongs
  to row b of the next window. Each device runs the recurrence for B / n rows.
* **Replicated** (a full copy on every device): params, masks, optimizer and pruning state,
  step and RNG. The models here are small (a GRU of 2560 is 60 MB in float32), the pruning
  transforms rank all the blocks of a matrix against one threshold, and a replicated mask
  means the same forward pass everywhere. XLA turns the mean loss over the sharded batch
  into a per-device partial sum and an all-reduce, so the gradients, and every update
  computed from them, arrive identical on every device. Sharding the weights themselves
  (model parallelism for hidden sizes of 8192 and up) is a design in ``WORKSPACE.md``, not
  implemented.

Multi-host: :func:`initialize_distributed` (called by ``launch.py`` before any JAX work)
joins the processes; each process then reads the whole global batch from the
deterministic input pipeline and places only the rows of its own devices
(:func:`put_batch`). Orbax saves and restores the sharded state from all processes at once.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process JAX job; call before any JAX computation.

    With the three arguments set, ``jax.distributed.initialize`` gets them as they are.
    With none set, it is called without arguments (JAX reads the job from the environment)
    only when the environment names a job of several processes: a SLURM step of more than
    one task, Open MPI's ``OMPI_COMM_WORLD_SIZE`` above 1, several ``TPU_WORKER_HOSTNAMES``,
    or ``JAX_COORDINATOR_ADDRESS``. Otherwise this is a single-process run and nothing
    happens.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: processes in the job, >= 1.
      process_id: this process's index, 0 to ``num_processes - 1``.

    Returns:
      Whether ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: only some of the three set, or ``process_id`` out of range.
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-host flags: {', '.join(missing)} missing; pass all three of "
                "--coordinator_address, --num_processes, --process_id, or none of them (then "
                "JAX detects a SLURM or TPU job from the environment)."
            )
        if num_processes < 1:
            raise ValueError(f"--num_processes={num_processes} must be >= 1.")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} is not one of the {num_processes} processes of "
                f"--num_processes={num_processes}: process ids run from 0 to "
                f"{num_processes - 1}."
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _cluster_job_in_environment():
        jax.distributed.initialize()
        return True
    return False


def _cluster_job_in_environment() -> bool:
    env = os.environ
    return (
        int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or bool(env.get("JAX_COORDINATOR_ADDRESS"))
    )


def mesh_size(config: ml_collections.ConfigDict) -> int:
    """The number of devices of the ``data`` axis: ``config.mesh.data``, -1 for all.

    A config without a ``mesh`` section runs on all devices.

    Raises:
      ValueError: more devices asked for than exist, a size below 1 other than -1, or a
        multi-process run on fewer than all devices.
    """
    available = jax.device_count()
    size = config.get("mesh", {}).get("data", -1)
    if size == -1:
        return available
    if size < 1:
        raise ValueError(f"config.mesh.data={size} must be -1 (all devices) or >= 1.")
    if size > available:
        raise ValueError(
            f"config.mesh.data={size} asks for {size} devices but only {available} exist "
            f"({jax.devices()[0].platform}); set --config.mesh.data=-1 to use all of them."
        )
    if jax.process_count() > 1 and size != available:
        raise ValueError(
            f"config.mesh.data={size}: a run of {jax.process_count()} processes uses all "
            f"{available} devices; set --config.mesh.data=-1."
        )
    return size


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Each device of the ``data`` axis gets an equal part of every batch.

    Raises:
      ValueError: ``batch_size`` or ``eval_batch_size`` not a multiple of ``num_devices``.
    """
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % num_devices:
            lower = config[key] // num_devices * num_devices
            raise ValueError(
                f"config.{key}={config[key]} (global, over all devices) is not divisible by "
                f"the {num_devices} devices of the data axis (config.mesh.data="
                f"{config.get('mesh', {}).get('data', -1)}); use a multiple of {num_devices}, "
                f"e.g. {lower or num_devices} or {lower + num_devices}, or fewer devices."
            )


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The 1-D ``data`` mesh of :func:`mesh_size` devices, batch sizes checked against it."""
    size = mesh_size(config)
    check_batch_sizes(config, size)
    return Mesh(np.array(jax.devices()[:size]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings of a :class:`bsrnn.train.TrainState`: ``carry`` over ``data``, the rest
    replicated (see the module docstring)."""
    shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), state)
    carry = jax.tree_util.tree_map(lambda _: batch_sharded(mesh), state.carry)
    return shardings.replace(carry=carry)


def put(tree: Any, shardings: Any) -> Any:
    """Place host values (the same in every process) as global arrays with ``shardings``.

    Each process copies only the slices of its own devices, so this works across hosts.
    """

    def place(value: Any, sharding: NamedSharding) -> jax.Array:
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(place, tree, shardings)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """A global batch, or a carry: a tree of (B, ...) host arrays, whole in every process,
    as global arrays with their rows split over ``data``."""
    return put(batch, jax.tree_util.tree_map(lambda _: batch_sharded(mesh), batch))


def to_host(value: jax.Array) -> np.ndarray:
    """A global array as one NumPy array in every process (gathered across hosts)."""
    if value.is_fully_addressable:
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def is_primary() -> bool:
    """Whether this process writes logs and reports (process 0)."""
    return jax.process_index() == 0
