"""One sharded code path for 1 CPU, N local devices and multi-host pods.

A 1-D ``jax.sharding.Mesh`` with axis ``data`` spans every device of every process. Batches
are split over it along their first axis; train states are replicated, or (``fsdp``) each
large parameter and its optimiser moments are split along one axis. ``jax.jit`` with these
shardings lets XLA insert the collectives, so a step on 8 devices computes what it computes
on 1 with the same global batch. Several processes (TPU pod hosts, SLURM tasks, local CPU
processes) join through ``jax.distributed.initialize`` first; each then feeds only its own
rows of every global batch.
"""

import os
import queue
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Parameters smaller than this stay replicated under fsdp (splitting them costs more than it saves).
FSDP_MIN_SIZE = 2**14


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the processes of a multi-process run (``config.parallel.distributed``).

  With ``coordinator_address`` empty, JAX detects the cluster itself (Cloud TPU pods, SLURM,
  Open MPI); a local run names ``coordinator_address``, ``num_processes`` and ``process_id``
  (``launch/local_multiprocess.sh``). A no-op for single-process runs. ValueError when no
  cluster is found.
  """
  settings = config.get("parallel", ml_collections.ConfigDict())
  if not settings.get("distributed", False) or jax.distributed.is_initialized():
    return
  kwargs = {}
  if settings.get("coordinator_address", ""):
    kwargs = dict(coordinator_address=settings.coordinator_address,
                  num_processes=settings.num_processes, process_id=settings.process_id)
  else:
    device_ids = slurm_local_device_ids(os.environ)
    if device_ids is not None:
      kwargs = dict(local_device_ids=device_ids)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as error:
    if "coordinator_address" in kwargs:
      raise
    raise ValueError(
        "parallel.distributed=True found no cluster to join (Cloud TPU pod, SLURM, Open MPI): "
        "start it through launch/ (e.g. launch/local_multiprocess.sh N ... on one machine) or "
        f"set parallel.coordinator_address, num_processes and process_id ({error})") from error


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
  """This node's task count from SLURM's compressed list, e.g. '8(x3),4' and SLURM_NODEID."""
  listing = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", ""))
  counts = []
  for entry in filter(None, listing.split(",")):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", entry)
    if match is None:
      return None
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = int(environ.get("SLURM_NODEID", "0"))
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
  """The GPUs of ``CUDA_VISIBLE_DEVICES`` (indices) that this SLURM task drives; None: JAX's.

  JAX's SLURM detection gives task ``SLURM_LOCALID`` the single GPU of that index: right for
  one task per GPU (launch/slurm_gpu.sbatch), wrong for one task per node (it would drive one
  GPU of eight) and for tasks that SLURM binds to their own GPUs (``--gpus-per-task``,
  ``--gpu-bind``: a task sees only those, from index 0). Here the node's visible GPUs are
  split evenly over its tasks, and a task that sees fewer GPUs than the node has tasks, or
  has ``--gpus-per-task``, drives all it sees. None outside SLURM, without
  ``CUDA_VISIBLE_DEVICES``, or with ``JAX_LOCAL_DEVICE_IDS`` set (JAX reads that itself).
  """
  if ("SLURM_JOB_ID" not in environ or "JAX_LOCAL_DEVICE_IDS" in environ
      or environ.get("CUDA_VISIBLE_DEVICES", "NoDevFiles") in ("", "NoDevFiles")):
    return None  # SLURM writes NoDevFiles for a step without GPUs
  visible = len(environ["CUDA_VISIBLE_DEVICES"].split(","))
  tasks = _tasks_on_this_node(environ)
  if "SLURM_GPUS_PER_TASK" in environ or (tasks is not None and visible < tasks):
    return list(range(visible))
  if tasks is None or visible % tasks:
    return None
  per_task = visible // tasks
  first = int(environ.get("SLURM_LOCALID", "0")) * per_task
  return list(range(first, first + per_task))


def is_primary() -> bool:
  """True on the process that writes files other than checkpoints (process 0)."""
  return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D data mesh over the first ``num_devices`` devices (default: all, every process)."""
  devices = jax.devices()
  if num_devices is not None:
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError("a multi-process run uses every device; leave num_devices unset.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """A 1-D data mesh over this process's devices: attacks, crafting and evaluation split their
  batches over it, while processes split the batches among themselves (``owns``)."""
  return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def owns(index: int) -> bool:
  """Whether this process handles item ``index`` of a list shared round-robin by processes."""
  return index % jax.process_count() == jax.process_index()


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Element-wise sum of ``values`` over all processes (``values`` itself for one process)."""
  if jax.process_count() == 1:
    return np.asarray(values)
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)


def to_host(tree: Any) -> Any:
  """Numpy copies of every leaf, however it is sharded over devices and processes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def pad_batch(arrays: Sequence[np.ndarray], multiple: int) -> tuple[tuple, int]:
  """Arrays padded (repeating their last row) to a multiple of ``multiple`` rows, and the
  original row count: a batch that splits evenly over devices."""
  count = len(arrays[0])
  extra = -count % multiple
  if not extra:
    return tuple(arrays), count
  return tuple(np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in arrays), count


def put_local_batch(arrays: Sequence[np.ndarray], mesh: Mesh) -> tuple[tuple, int]:
  """Host arrays padded to split evenly over ``mesh`` (``pad_batch``) and put there, split
  along their first axis; and the original row count."""
  padded, count = pad_batch(arrays, mesh.size)
  return tuple(jax.device_put(array, batch_sharding(mesh)) for array in padded), count


def jit_batched(fn: Callable, mesh: Mesh | None, batch_args: Sequence[bool],
                batch_output: bool = True) -> Callable:
  """``jax.jit(fn)`` with explicit shardings: argument i split over ``data`` if
  ``batch_args[i]`` else replicated; the output split (``batch_output``) or replicated.
  With ``mesh`` None: plain ``jax.jit`` on the default device."""
  if mesh is None:
    return jax.jit(fn)
  split, whole = batch_sharding(mesh), replicated(mesh)
  return jax.jit(fn, in_shardings=tuple(split if b else whole for b in batch_args),
                 out_shardings=split if batch_output else whole)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``data``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], num_shards: int) -> PartitionSpec:
  """Splits the largest axis divisible by ``num_shards``; small leaves stay replicated."""
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
  """A sharding per leaf of ``state``: replicated, or FSDP-style split of large leaves."""
  num_shards = mesh.shape[DATA_AXIS]

  def sharding(leaf):
    shape = np.shape(leaf)
    if not fsdp or num_shards == 1 or not shape:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(shape, num_shards))

  return jax.tree.map(sharding, state)


def _put(leaf: Any, sharding: NamedSharding) -> jax.Array:
  """``leaf`` (a value identical on every process) as a global array with ``sharding``."""
  if jax.process_count() == 1 or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
    return jax.device_put(leaf, sharding)
  # Across processes device_put takes host values only; PRNG keys travel as their raw bits.
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    bits = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
    return jax.random.wrap_key_data(bits, impl=jax.random.key_impl(leaf))
  return jax.device_put(np.asarray(leaf), sharding)


def place_state(state: Any, shardings: Any) -> Any:
  """Puts every leaf of ``state`` (identical on every process) on its sharding."""
  return jax.tree.map(_put, state, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree`` (identical on every process) replicated on every device of ``mesh``."""
  return jax.tree.map(lambda leaf: _put(leaf, replicated(mesh)), tree)


def local_rows(global_batch_size: int, mesh: Mesh) -> slice:
  """This process's rows of a global batch: contiguous, in process order."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(f"batch size {global_batch_size} must be a multiple of the "
                     f"{num_devices} devices of the mesh; change the config's batch_size.")
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def shard_batch(arrays: Iterable[np.ndarray], mesh: Mesh, global_batch_size: int) -> tuple:
  """Global arrays, split over ``data``, from this process's rows (``local_rows``) of a batch."""
  sharding = batch_sharding(mesh)
  return tuple(jax.make_array_from_process_local_data(
      sharding, np.asarray(local), (global_batch_size,) + np.shape(local)[1:]) for local in arrays)


def prefetch(batches: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs ``batches`` (which should return device arrays) ``size`` items ahead in a thread, so
  host-side gathering and host-to-device copies overlap the running step. Closing the iterator
  early (a ``break`` in the loop over it) stops the thread and drops what it holds."""
  if size <= 0:
    yield from batches
    return
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done, stop = object(), threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in batches:
        if not put(item):
          return
      put(done)
    except BaseException as error:  # pylint: disable=broad-except
      put(error)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()


def describe(mesh: Mesh) -> str:
  return (f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), "
          f"{jax.local_device_count()} local {jax.default_backend()} device(s) each")
