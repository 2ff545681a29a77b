"""One launch through the executor: guarded arguments, the compared schedules, and the errors.

Shared by metal_harness and cuda_harness: both bind their arguments into an array of slots
(`bind`), and this runs the launch once per schedule from the same copies of the arguments.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable

import torch

from ._guard import GuardedStorages

# Orders in which the executor runs a threadgroup's threads between two barriers.
SCHEDULES = {"alternate": 0, "alternate-forward": 1, "forward": 2, "reverse": 3}
# "compare" (the default) runs every dispatch under two opposite schedules and requires equal results.
COMPARED_SCHEDULES = ("alternate", "alternate-forward")

METAL, CUDA = 0, 1  # the executor's dialects (words of its messages, memory limits)


def schedules(env_var: str = "METAL_HARNESS_SCHEDULE") -> tuple[str, ...]:
    name = os.environ.get(env_var, "compare")
    if name == "compare":
        return COMPARED_SCHEDULES
    if name not in SCHEDULES:
        raise ValueError(f"{env_var} must be 'compare' or one of {sorted(SCHEDULES)}, got {name!r}")
    return (name,)


def launch(executor: ctypes.CDLL, entry: int, *, label: str, tensors: dict[int, torch.Tensor],
           constants: dict[int, ctypes.Array], names: list[str], bind: Callable[[GuardedStorages], ctypes.Array],
           grid: list[int], group: list[int], schedule_var: str, guard_enabled: bool, barrier_hint: str,
           dialect: int = METAL, shared_limit: int = 0, dynamic_shared: int = 0) -> None:
    """Runs `entry` over `grid` threads (3 ints) in groups of `group` threads.

    `tensors` / `constants`: the arguments copied into guarded buffers (by argument index);
    `bind(guard)` returns the slot array the entry receives, pointing into those copies.
    `label` starts every message ("kernel 'name'"), `names[i]` names argument i, `barrier_hint`
    says what is missing when two schedules disagree. Results are written back even on error.
    """
    guard = GuardedStorages(executor, tensors, constants, enabled=guard_enabled)
    order = schedules(schedule_var) if guard.active else schedules(schedule_var)[:1]
    try:
        slots = bind(guard)
        first = None
        for run, schedule in enumerate(order):
            if run > 0:
                first = guard.snapshot()
                guard.reload()
            error = ctypes.create_string_buffer(2048)
            fault = ctypes.c_uint64(0)
            status = executor.mh_dispatch(entry, slots, (ctypes.c_uint64 * 3)(*grid), (ctypes.c_uint64 * 3)(*group),
                                          SCHEDULES[schedule], dialect, shared_limit, dynamic_shared, error,
                                          len(error), ctypes.byref(fault))
            if status != 0:
                message = f"{label}: {error.value.decode(errors='replace')}"
                if fault.value:
                    where = guard.describe_fault(fault.value, names)
                    message += f" ({where})" if where else " (outside the memory of every argument)"
                raise RuntimeError(message)
            overrun = guard.describe_overrun(names)
            if overrun:
                raise RuntimeError(f"{label}: out-of-bounds access: {overrun}")
        difference = guard.first_difference(first, names) if first is not None else None
        if difference:
            raise RuntimeError(
                f"{label}: the result depends on the order in which the threads of a {barrier_hint[0]} run "
                f"({order[0]!r} and {order[1]!r} schedules differ at {difference}): {barrier_hint[1]}")
    finally:
        guard.release(write_back=True)
