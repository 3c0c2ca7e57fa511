"""Engine slots: the devices each engine may use, and one file lock per slot so two engines never share one.

A box with several GPUs runs one engine per slot: a slot is `tensor_parallel_size` GPUs (slot 0 is
GPUs 0..tp-1, slot 1 the next tp, ...). A process that loads an engine first takes a slot's lock
(`gpu-slot-N.lock`, `fcntl.flock`) and keeps it while the engine lives; the engine's processes see
only the slot's devices (`CUDA_VISIBLE_DEVICES`, set before vLLM starts its engine core). The kernel
drops a flock when the last process holding it exits, so a killed step frees its slot, and a lock
passed to a child process (`pass_fds`) stays held while either of them lives.

With the warm engine host, the clients of one host share its slot (a shared flock): batches of the
same model run on one engine at once, while a batch for another model (or an engine in the process)
needs the slot exclusively and so waits until they have all detached. So that a stream of batches of
one model cannot keep it waiting for ever, a waiter for another model leaves `gpu-slot-N.drain`: new
clients do not join a slot marked so, and whoever takes the slot exclusively removes the mark.

On the CPU build a "device" is a slot of CPU cores: with more than one slot each engine's threads
are bound to its own cores (`VLLM_CPU_OMP_THREADS_BIND`), so two CPU engines do not fight over one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_DEVICE_FILE = re.compile(r"^nvidia(\d+)$")


class SlotConfigError(ValueError):
    """The GPU settings do not fit the machine; the message names the settings."""


@dataclass(frozen=True)
class EngineSlot:
    """One engine's devices: GPU ids as CUDA names them, or CPU core lists (one per tensor-parallel rank)."""

    index: int
    devices: tuple[str, ...]
    platform: str  # "cuda" or "cpu"
    env: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> str:
        """E.g. `slot 1 (cuda 2,3)`."""
        return f"slot {self.index} ({self.platform} {'|'.join(self.devices) if self.platform == 'cpu' else ','.join(self.devices)})"


@functools.cache
def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else NVML's count, else the NVIDIA
    device files.

    Found without initialising CUDA (no engine may touch it before a slot's devices are chosen), and
    once per process: a process that loads an engine narrows its own CUDA_VISIBLE_DEVICES to its
    slot, and must still see the machine's other slots afterwards.
    """
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        devices = []
        for name in declared.split(","):
            name = name.strip()
            if not name or name.startswith("-"):  # CUDA ignores every device after an invalid one
                break
            devices.append(name)
        return devices
    count = _nvml_device_count()
    if count is not None:
        return [str(index) for index in range(count)]
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return [str(n) for n in sorted(int(m.group(1)) for m in map(_DEVICE_FILE.match, names) if m)]


def _vllm_pynvml() -> Any:
    """vLLM's own copy of the NVML bindings, loaded from its file: importing `vllm.third_party` would
    import vLLM and torch (tens of seconds), which a run worker attached to an engine host never needs."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "third_party" / "pynvml.py"
        module_spec = importlib.util.spec_from_file_location("_vbatch_pynvml", path)
        if path.is_file() and module_spec is not None and module_spec.loader is not None:
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    return None


def _nvml_devices() -> list[str] | None:
    """The name of each GPU NVML sees, None without a driver (the CPU build)."""
    # NVML sees the GPUs a container was given (device files may show the host's); it never initialises CUDA.
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        pynvml = _vllm_pynvml()
        if pynvml is None:
            return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 (no driver: the CPU build)
        return None
    try:
        names = (pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
                 for index in range(int(pynvml.nvmlDeviceGetCount())))
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_device_count() -> int | None:
    devices = _nvml_devices()
    return None if devices is None else len(devices)


def gpu_names() -> list[str]:
    """The names of the machine's GPUs (NVML; no CUDA initialised), empty on the CPU build."""
    return _nvml_devices() or []


def engine_slots(gpus: int | None, tensor_parallel_size: int, visible: list[str] | None = None,
                 cpus: Iterable[int] | None = None) -> list[EngineSlot]:
    """The engine slots of this machine: `gpus` devices (None: all visible) in groups of `tensor_parallel_size`.

    Without a visible GPU (the CPU build) `gpus` counts CPU "devices" (default 1): the cores are
    split evenly among them.
    """
    visible = list(visible_gpus()) if visible is None else visible
    tp = tensor_parallel_size
    if visible:
        count = gpus if gpus is not None else len(visible)
        if count > len(visible):
            raise SlotConfigError(f"VBATCH_GPUS={count}, but this machine shows {len(visible)} GPU(s)")
    else:
        count = gpus if gpus is not None else tp
    if count < tp or count % tp:
        setting = f"VBATCH_GPUS={count}" if gpus is not None else f"{count} GPUs (VBATCH_GPUS unset: every visible one)"
        raise SlotConfigError(f"{setting} is not a multiple of VBATCH_TENSOR_PARALLEL_SIZE={tp}")
    slots = count // tp
    if visible:
        return [EngineSlot(i, tuple(visible[i * tp:(i + 1) * tp]), "cuda",
                           {"CUDA_VISIBLE_DEVICES": ",".join(visible[i * tp:(i + 1) * tp])}) for i in range(slots)]
    cores = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if slots == 1:
        return [EngineSlot(0, ("all",), "cpu")]  # vLLM binds its threads itself
    # One core list per tensor-parallel rank of every slot; more ranks than cores share cores.
    share = max(len(cores) // count, 1)
    ranks = [",".join(str(cores[(r * share + k) % len(cores)]) for k in range(share)) for r in range(count)]
    return [EngineSlot(i, tuple(ranks[i * tp:(i + 1) * tp]), "cpu",
                       {"VLLM_CPU_OMP_THREADS_BIND": "|".join(ranks[i * tp:(i + 1) * tp])}) for i in range(slots)]


class SlotLease:
    """A slot held by this process (and by any child it passes `fileno()` to) until `release()`.

    `shared`: held together with other clients of the same engine host (see the module's docstring).
    """

    def __init__(self, slot: EngineSlot, handle: IO[str], shared: bool = False):
        self.slot = slot
        self._handle = handle
        self.shared = shared

    def share(self) -> None:
        """Let other clients of this slot's engine host join (an exclusive lease becomes shared)."""
        if not self.shared and not self._handle.closed:
            # Linux converts by dropping the lock and taking the shared one; a waiter polling in
            # between may win the slot, which then looks to this client like its host dying.
            fcntl.flock(self._handle, fcntl.LOCK_SH)
            self.shared = True

    def fileno(self) -> int:
        return self._handle.fileno()

    @property
    def held(self) -> bool:
        return not self._handle.closed

    def release(self) -> None:
        """Give the slot back (the lock goes once no child holding it lives either)."""
        if not self._handle.closed:
            self._handle.close()


def _lock_path(lock_dir: Path, index: int) -> Path:
    return lock_dir / f"gpu-slot-{index}.lock"


def _drain_path(lock_dir: Path, index: int) -> Path:
    return lock_dir / f"gpu-slot-{index}.drain"


def try_slot(lock_dir: Path, slot: EngineSlot, shared: bool = False) -> SlotLease | None:
    """The slot's lease if it is free now (or, `shared`, held only by other sharers), else None."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = _lock_path(lock_dir, slot.index).open("a+")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if shared:
        return SlotLease(slot, handle, shared=True)
    _drain_path(lock_dir, slot.index).unlink(missing_ok=True)
    # Who holds it, for people and tests: the lock itself is the flock, not this text.
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "devices": list(slot.devices)}))
    handle.flush()
    return SlotLease(slot, handle)


def acquire_slot(lock_dir: Path, slots: list[EngineSlot], prefer: Callable[[EngineSlot], bool] | None = None,
                 poll_seconds: float = 0.5, timeout: float | None = None,
                 share: Callable[[EngineSlot], bool] | None = None,
                 drain: Callable[[EngineSlot], bool] | None = None) -> SlotLease:
    """A free slot (those `prefer` likes first), waiting until one is free.

    `share`: a slot it accepts is joined with a shared lease (other clients of the same engine host),
    unless it is marked for draining. `drain`: while waiting, the first slot it accepts for draining
    (one whose host runs another model) is marked so.
    """
    ordered = sorted(slots, key=lambda s: not prefer(s)) if prefer else list(slots)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for slot in ordered:
            if share is not None and not _drain_path(lock_dir, slot.index).exists() and share(slot):
                lease = try_slot(lock_dir, slot, shared=True)
                if lease is not None:
                    if share(slot):  # checked again under the lock: the host cannot change now
                        return lease
                    lease.release()
            lease = try_slot(lock_dir, slot)
            if lease is not None:
                return lease
        if drain is not None:
            busy = next((slot for slot in ordered if drain(slot)), None)
            if busy is not None:
                _drain_path(lock_dir, busy.index).touch()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no engine slot became free in {timeout:.0f}s")
        time.sleep(poll_seconds)


def free_slots(lock_dir: Path, slots: list[EngineSlot], most: int) -> list[SlotLease]:
    """Leases on up to `most` of `slots` that are free now (none waited for)."""
    leases: list[SlotLease] = []
    for slot in slots:
        if len(leases) >= most:
            break
        lease = try_slot(lock_dir, slot)
        if lease is not None:
            leases.append(lease)
    return leases


def slot_holders(lock_dir: Path, slots: list[EngineSlot]) -> dict[int, int | None]:
    """For each slot, the pid that holds it (None: free). For status and tests; racy by nature."""
    holders: dict[int, int | None] = {}
    for slot in slots:
        lease = try_slot(lock_dir, slot)
        if lease is not None:
            lease.release()
            holders[slot.index] = None
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            holders[slot.index] = json.loads(_lock_path(lock_dir, slot.index).read_text())["pid"]
            continue
        holders[slot.index] = -1
    return holders
