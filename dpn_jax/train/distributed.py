"""Several processes, one program: ``jax.distributed.initialize`` for multi-host training.

Start one ``dpn-jax train`` per host (per GPU node, or per TPU VM of a pod slice) with the same
arguments; after :func:`initialize` every process sees all devices (``jax.devices()``), the
mesh of :mod:`dpn_jax.train.sharding` spans them, and each process feeds its devices' rows of
every global batch (every process draws the same batches: same seed, same data files).

* GPU cluster: ``--coordinator HOST:PORT --num-processes P --process-id I`` on process ``I``
  (``HOST`` is process 0's address), or the environment variables ``JAX_COORDINATOR_ADDRESS``
  (read by jax), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here);
* TPU pod slice, SLURM, Open MPI: ``--distributed`` alone; jax reads the cluster's environment.
"""

from __future__ import annotations

import os

import jax

from dpn_jax.errors import ConfigError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r}: expected an integer") from None


def wanted(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, auto: bool = False) -> bool:
    """Whether the arguments or the environment ask for a multi-process run."""
    return auto or any(v is not None for v in (coordinator, num_processes, process_id)) \
        or any(os.environ.get(k) for k in ENV)


def check_args(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Fail before jax does, with what to pass instead."""
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT, the address of process 0 "
                              "and a free port, e.g. --coordinator 10.0.0.1:1234")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes}: expected the number of processes, >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id}: expected 0 .. {num_processes - 1} "
                          f"(one distinct id per process, --num-processes {num_processes})")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Call ``jax.distributed.initialize`` when asked (see :func:`wanted`); returns whether this
    is a multi-process run. Must run before anything touches a device. Arguments left out come
    from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, then from jax's cluster detection."""
    if not wanted(coordinator, num_processes, process_id, auto):
        return False
    if jax.distributed.is_initialized():
        return True
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    check_args(coordinator, num_processes, process_id)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as err:  # nothing detected: jax names the missing value
        raise ConfigError(
            f"multi-process start failed ({err}): pass --coordinator HOST:PORT --num-processes P "
            "--process-id I on every process, or run inside a TPU pod slice, SLURM or Open MPI job "
            "with --distributed") from None
    return True


def process_info() -> str:
    return f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local devices"
