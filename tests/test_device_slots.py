"""Engine slots (resources/device_slots.py): the layout from the settings, and locks held by real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from resources.device_slots import SlotConfigError, acquire_slot, engine_slots, slot_holders, try_slot
from tests.support.files import REPO
from tests.support.waiting import wait_for

# A process that takes a slot of two, says which, and holds it until killed (or its stdin closes).
HOLDER = """
import json, sys
from pathlib import Path
from resources.device_slots import acquire_slot, engine_slots
lease = acquire_slot(Path(sys.argv[1]), engine_slots(2, 1, visible=["0", "1"]), poll_seconds=0.05)
print(json.dumps({"slot": lease.slot.index, "env": lease.slot.env}), flush=True)
sys.stdin.read()
"""


def start_holder(lock_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_slots_group_gpus_by_tensor_parallel_size_and_show_each_engine_only_its_own():
    slots = engine_slots(None, 2, visible=["0", "1", "2", "3"])
    assert [s.devices for s in slots] == [("0", "1"), ("2", "3")]
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert [s.devices for s in engine_slots(2, 1, visible=["GPU-a", "GPU-b", "GPU-c"])] == [("GPU-a",), ("GPU-b",)]


@pytest.mark.parametrize("gpus, tp, message", [(3, 2, "not a multiple"), (1, 2, "not a multiple"),
                                               (5, 1, "shows 4 GPU")])
def test_settings_that_do_not_fit_the_machine_are_refused(gpus, tp, message):
    with pytest.raises(SlotConfigError, match=message):
        engine_slots(gpus, tp, visible=["0", "1", "2", "3"])


def test_cpu_slots_bind_each_engine_to_its_own_cores():
    assert engine_slots(None, 1, visible=[], cpus=[0, 1])[0].env == {}  # one slot: vLLM binds by itself
    two = engine_slots(2, 1, visible=[], cpus=[0, 1, 2, 3])
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in two] == ["0,1", "2,3"]
    assert engine_slots(4, 2, visible=[], cpus=[0, 1, 2, 3])[1].env == {"VLLM_CPU_OMP_THREADS_BIND": "2|3"}


def test_two_processes_never_hold_one_slot_and_a_killed_holder_frees_its_slot(tmp_path):
    first, second = start_holder(tmp_path), start_holder(tmp_path)
    third = None
    try:
        taken = [json.loads(p.stdout.readline()) for p in (first, second)]
        assert sorted(t["slot"] for t in taken) == [0, 1]
        assert taken[0]["env"] != taken[1]["env"]
        third = start_holder(tmp_path)  # waits: both slots are held
        slots = engine_slots(2, 1, visible=["0", "1"])
        wait_for(lambda: all(slot_holders(tmp_path, slots).values()), 30, "both holders to hold their slots",
                 interval=0.05)
        assert third.poll() is None
        first.send_signal(signal.SIGKILL)  # the kernel drops its flock
        assert json.loads(third.stdout.readline())["slot"] == taken[0]["slot"]
        assert slot_holders(tmp_path, slots) == {taken[0]["slot"]: third.pid, taken[1]["slot"]: second.pid}
    finally:
        for process in (first, second, third):
            if process is not None:
                process.kill()
                process.wait()


def test_a_slot_passed_to_a_child_stays_held_while_the_child_lives(tmp_path):
    slots = engine_slots(2, 1, visible=["0", "1"])
    lease = acquire_slot(tmp_path, slots)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(lease.fileno(),))
    try:
        lease.release()
        assert try_slot(tmp_path, lease.slot) is None  # the child still holds the lock
        child.stdin.close()
        child.wait()
        again = try_slot(tmp_path, lease.slot)
        assert again is not None
        again.release()
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(tmp_path / f"gpu-slot-{lease.slot.index}.lock")


# In a process of its own: the engine resource's slot is process-wide state.
NARROWED = """
import json, os, sys
from resources.vllm_engine import VLLMEngine
engine = VLLMEngine(state_dir=sys.argv[1])
assert engine.data_parallel()
extra = engine.extra_slots(3)          # takes this process's own slot first, which narrows its view
narrowed = os.environ["CUDA_VISIBLE_DEVICES"]
own = engine.hand_over_slot()
print(json.dumps({"own": own.slot.devices, "extra": [l.slot.devices for l in extra], "narrowed": narrowed}))
for lease in [own, *extra]:
    lease.release()
VLLMEngine.release()
print(json.dumps({"restored": os.environ["CUDA_VISIBLE_DEVICES"]}))
"""


def test_a_process_holding_one_gpu_still_finds_the_free_others_and_gets_its_view_back(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1,2,3", VBATCH_TENSOR_PARALLEL_SIZE="1")
    busy = acquire_slot(tmp_path, engine_slots(None, 1, visible=["0", "1", "2", "3"]))  # slot 0: another step
    try:
        result = subprocess.run([sys.executable, "-c", NARROWED, str(tmp_path)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
    finally:
        busy.release()
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert first == {"own": ["1"], "extra": [["2"], ["3"]], "narrowed": "1"}
    assert second == {"restored": "0,1,2,3"}


def test_clients_of_one_host_share_a_slot_and_a_batch_for_another_model_drains_it(tmp_path):
    slot = engine_slots(1, 1, visible=["0"])[0]
    runs_model_a = {slot.index: True}  # what the slot's engine host runs, as the resource would read it

    def same(s):
        return runs_model_a[s.index]

    def other(s):
        return not runs_model_a[s.index]

    first = acquire_slot(tmp_path, [slot], share=same, drain=other)
    second = acquire_slot(tmp_path, [slot], share=same, drain=other, timeout=2)
    assert first.shared and second.shared  # two batches of model A on the one engine
    assert try_slot(tmp_path, slot) is None  # an engine of its own (or another model) must wait

    # A batch for model B waits for the slot and marks it for draining: a third batch of A no longer joins.
    with pytest.raises(TimeoutError):
        acquire_slot(tmp_path, [slot], share=other, drain=same, poll_seconds=0.05, timeout=0.3)
    assert (tmp_path / "gpu-slot-0.drain").exists()
    with pytest.raises(TimeoutError):
        acquire_slot(tmp_path, [slot], share=same, drain=other, poll_seconds=0.05, timeout=0.3)

    first.release()
    second.release()
    b = acquire_slot(tmp_path, [slot], share=other, drain=same, timeout=2)  # the sharers gone: B has it alone
    assert not b.shared and not (tmp_path / "gpu-slot-0.drain").exists()
    runs_model_a[slot.index] = False  # B's host replaced A's
    b.share()
    joined = acquire_slot(tmp_path, [slot], share=other, drain=same, timeout=2)  # another batch of B joins
    assert joined.shared
    b.release()
    joined.release()
    assert try_slot(tmp_path, slot) is not None
