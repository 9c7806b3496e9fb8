"""Many JAX processes as one run: joining them, which process speaks, and preemption.

A pod runs one JAX process per host. `jax.distributed` joins them through a coordinator (process 0's
host:port), and from then on they run the same program on one global mesh. The `distributed` config section:

    enabled                  false: one process (the default); true: join the others
    coordinator_address      host:port of process 0. null: auto-detected (Cloud TPU VMs, SLURM, Open MPI,
                             Kubernetes, as JAX detects them) or the JAX_COORDINATOR_ADDRESS environment variable
    num_processes            null: auto-detected
    process_id               null: auto-detected
    initialization_timeout   seconds to wait for every process to join (300)
    heartbeat_timeout        seconds of silence after which a process counts as dead and the others stop (100)
Setting any of the three addresses implies `enabled`.

Faults, and what the user sees:
- A process that cannot join in `initialization_timeout` seconds (a peer that never starts, a wrong address, a
  blocked port): one `error:` line naming the coordinator, the expected process count and this process's id,
  exit code 2, nothing written. JAX itself would abort with a C++ stack trace; a watchdog thread speaks first.
- A process that dies mid-run: where the collectives notice (CPU's gloo, GPU), the others stop at their next
  collective with one `error:` line (`stop_on_peer_failure`); where they would wait (TPU collectives; a process
  waiting in a checkpoint's barrier), JAX stops them once `heartbeat_timeout` has passed, naming the dead process
  (`The following tasks are unhealthy (stopped sending heartbeats): 1`). The newest checkpoint stays intact (Orbax commits a checkpoint by renaming it once every
  process has written its part).

Preemption (`Preemption`): SIGTERM is what Cloud TPU, GKE and SLURM send before they take a host. With several
processes, JAX's preemption notifier catches it and `reached_preemption_sync_point` names the same step on every
process; with one process a signal handler sets a flag. The trainer asks at every step boundary, saves that
step, waits for the save, prints `preempted at step N: checkpoint saved` and exits with `EXIT_PREEMPTED` (143,
the code of a process ended by SIGTERM, so schedulers' retry rules that look for it apply unchanged).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import signal
import sys
import threading

from jsmaug.errors import DataError
from jsmaug.models.config import ConfigError

EXIT_PREEMPTED = 143  # 128 + SIGTERM
EXIT_ERROR = 2


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100

    @property
    def active(self) -> bool:
        return self.enabled or any(v is not None for v in (self.coordinator_address, self.num_processes,
                                                          self.process_id))

    def validate(self) -> None:
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ConfigError(f"distributed.coordinator_address: expected host:port, got {self.coordinator_address!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes: must be >= 1, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or (self.num_processes is not None
                                                                    and self.process_id >= self.num_processes)):
            raise ConfigError(f"distributed.process_id: must be in [0, num_processes), got {self.process_id}")
        for key in ("initialization_timeout", "heartbeat_timeout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distributed.{key}: must be >= 1 second, got {getattr(self, key)}")


def initialize(cfg: DistributedConfig) -> None:
    """Joins this process to the others (before any other JAX call); nothing happens for a one-process run."""
    if not cfg.active:
        return
    import jax

    addr = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    me = "?" if cfg.process_id is None else cfg.process_id
    count = "?" if cfg.num_processes is None else cfg.num_processes
    message = (f"error: distributed: process {me} could not join the run within distributed.initialization_timeout="
               f"{cfg.initialization_timeout}s (coordinator {addr or '(auto-detected)'}, {count} processes expected). "
               "Check that every process was started, with the same coordinator_address and num_processes, and that "
               "the coordinator's port is reachable from this host. Nothing was written.")
    watchdog = threading.Timer(cfg.initialization_timeout, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    kwargs = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
              "process_id": cfg.process_id,
              # JAX aborts with a stack trace at its own timeout: leave the watchdog time to speak first.
              "initialization_timeout": cfg.initialization_timeout + 30}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = cfg.heartbeat_timeout
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        raise ConfigError(f"distributed: {err} No cluster was detected (Cloud TPU VM, SLURM, Open MPI, Kubernetes) "
                          "to fill it in: set distributed.coordinator_address, num_processes and process_id") from err
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_ERROR)


def stop_on_peer_failure(err: BaseException, checkpoints) -> None:
    """In a multi-process run, a collective that fails because a peer is gone (CPU and GPU transports report a
    closed connection) ends this process with one `error:` line, skipping JAX's shutdown barrier, which would
    wait for the dead process and then abort with a stack trace. Returns when it is not such a failure."""
    import jax

    if jax.process_count() < 2 or not isinstance(err, getattr(jax.errors, "JaxRuntimeError", RuntimeError)):
        return
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    _give_up(f"error: process {jax.process_index()} of {jax.process_count()}: a collective with the other processes "
             f"failed ({first}); another process has probably stopped: see its output. The newest complete "
             f"checkpoint in {checkpoints} is intact: start every process again to resume from it.")


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """Process 0 writes the run's files and prints its progress (see `run_outputs`)."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here for the others (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class WriterFailed(DataError):
    """Raised on the other processes when `from_writer`'s computation failed on process 0 (the message says
    where; process 0 prints the error itself)."""


def from_writer(compute, like, where: str = "process 0"):
    """`compute()` on process 0 and its result on every process: an array of `like`'s shape and dtype, sent as
    raw bytes (no float64 -> float32 on the way). One process: just `compute()`. Where `compute` raises on process
    0, it raises there and the others raise `WriterFailed(where)`, so that no process waits forever. A collective:
    every process calls it, in the same order."""
    import jax
    import numpy as np

    like = np.asarray(like)
    if jax.process_count() == 1:
        return np.asarray(compute(), like.dtype).reshape(like.shape)
    from jax.experimental import multihost_utils

    failure, value = None, np.zeros_like(like)
    if jax.process_index() == 0:
        try:
            value = np.asarray(compute(), like.dtype).reshape(like.shape)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
            failure = err
    payload = np.concatenate([np.array([failure is not None], np.uint8),
                              np.ascontiguousarray(value).reshape(-1).view(np.uint8)])
    payload = np.asarray(multihost_utils.broadcast_one_to_all(payload), np.uint8)
    if failure is not None:
        raise failure
    if payload[0]:
        raise WriterFailed(where)
    return payload[1:].view(like.dtype).reshape(like.shape)


class Preemption:
    """Whether the run has been asked to stop (SIGTERM), answered alike on every process at the same step.

    Call `reached(step)` at every step boundary, on every process, with increasing steps."""

    def __init__(self, log=print):
        import jax

        self.multi = jax.process_count() > 1
        self.flag = False
        self._previous = None
        if not self.multi and threading.current_thread() is threading.main_thread():
            def on_sigterm(signum, frame):
                self.flag = True
                log("note: SIGTERM received: the run saves a checkpoint after this step and stops")
            self._previous = signal.signal(signal.SIGTERM, on_sigterm)

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.flag

    def close(self) -> None:
        """SIGTERM ends the process again (the final checkpoint is saved by then)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Preempted(Exception):
    """The run stopped at a preemption point after saving its checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}: checkpoint saved; run the same command again to resume")
        self.step = step
