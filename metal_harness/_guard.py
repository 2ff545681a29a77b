"""Guarded copies of tensor storages, so that an out-of-bounds access by a kernel is an error.

A kernel receives each tensor's storage from its first element on (as compile_shader binds it).
For the dispatch, every storage the arguments use is copied into a buffer that has an
inaccessible zone of 1 MiB right after its end and one before its start; the executor turns the fault of
an access outside into an error, which `describe_fault` attributes to the arguments. Tensors that
share a storage (an output aliasing an input) share one copy, so aliasing behaves as on the GPU.
Set METAL_HARNESS_GUARD=0 to bind the tensors' own memory instead.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

# Inaccessible bytes on each side of a guarded buffer (address space only, no memory).
GUARD_BYTES = 1 << 20


def enabled(env_var: str = "METAL_HARNESS_GUARD") -> bool:
    return os.environ.get(env_var, "1") != "0"


POISON = 0xFF


class _Region:
    """A guarded copy of `nbytes` at `source`. The bytes between its ends and the inaccessible zones
    (up to 15 after the end, kept so that the copy has the source's alignment, and less than a page
    before the start) are poisoned: a read there gets NaN / -1, a write there is reported by `overrun`."""

    def __init__(self, source: int, nbytes: int, dll: ctypes.CDLL):
        self.source = source
        self.nbytes = nbytes
        self._dll = dll
        self._mapping = ctypes.c_void_p()
        self._mapping_size = ctypes.c_size_t()
        start = dll.mh_guarded_alloc(nbytes, source % 16, GUARD_BYTES, ctypes.byref(self._mapping),
                                     ctypes.byref(self._mapping_size))
        if not start:
            raise MemoryError(f"cannot map a guarded buffer of {nbytes} bytes")
        self.start = start
        page = os.sysconf("SC_PAGESIZE")
        self.slack_after = -(start + nbytes) % page
        self.slack_before = start % page
        ctypes.memset(start + nbytes, POISON, self.slack_after)
        ctypes.memset(start - self.slack_before, POISON, self.slack_before)
        ctypes.memmove(start, source, nbytes)

    def overrun(self) -> str | None:
        """Where the kernel wrote into the poisoned bytes around the copy, if it did."""
        after = ctypes.string_at(self.start + self.nbytes, self.slack_after)
        if after.lstrip(bytes([POISON])):
            return f"{len(after) - len(after.lstrip(bytes([POISON])))} bytes past the end of"
        before = ctypes.string_at(self.start - self.slack_before, self.slack_before)
        if before.rstrip(bytes([POISON])):
            return f"{len(before) - len(before.rstrip(bytes([POISON]))) + 1} bytes before the start of"
        return None

    def reload(self) -> None:
        ctypes.memmove(self.start, self.source, self.nbytes)

    def contents(self) -> bytes:
        return ctypes.string_at(self.start, self.nbytes)

    def release(self, write_back: bool) -> None:
        if write_back:
            ctypes.memmove(self.source, self.start, self.nbytes)
        self._dll.mh_guarded_free(self._mapping, self._mapping_size)


class GuardedStorages:
    """Maps tensor arguments to pointers into guarded copies (or to their own memory when off)."""

    def __init__(self, dll: ctypes.CDLL, tensors: dict[int, torch.Tensor], constants: dict[int, ctypes.Array],
                 enabled: bool = True):
        """`constants`: the packed Python scalars and lists (guarded too: `constant long* a` read past a list).
        `enabled` False: bind the tensors' own memory (no copies, no out-of-bounds detection)."""
        self._tensors = tensors
        self._regions: dict[int, _Region] = {}  # storage (or constant buffer) address -> region
        self._users: dict[int, list[int]] = {}
        self._constants = constants
        if not enabled:
            return
        for i, buffer in constants.items():
            address = ctypes.addressof(buffer)
            self._regions[address] = _Region(address, ctypes.sizeof(buffer), dll)
            self._users[address] = [i]
        by_storage: dict[int, list[int]] = {}
        for i, t in tensors.items():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(i)
        for base, users in by_storage.items():
            storage = tensors[users[0]].untyped_storage()
            first = min(tensors[i].data_ptr() for i in users)
            self._regions[base] = _Region(first, base + storage.nbytes() - first, dll)
            self._users[base] = users

    def pointer(self, i: int) -> int:
        if i in self._constants:
            address = ctypes.addressof(self._constants[i])
            region = self._regions.get(address)
            return address if region is None else region.start
        t = self._tensors[i]
        region = self._regions.get(t.untyped_storage().data_ptr())
        return t.data_ptr() if region is None else region.start + (t.data_ptr() - region.source)

    def describe_fault(self, address: int, kernel_args: list[str]) -> str | None:
        """Which argument an access at `address` fell outside of, if any."""
        for base, region in self._regions.items():
            names = " and ".join(kernel_args[i] for i in self._users[base])
            end = region.start + region.nbytes
            if region.start - GUARD_BYTES <= address < region.start:
                return f"{region.start - address} bytes before the start of {names}"
            if end <= address < end + GUARD_BYTES:
                return f"{address - end} bytes past the end of {names} ({region.nbytes} bytes bound)"
        return None

    @property
    def active(self) -> bool:
        return bool(self._regions)

    def describe_overrun(self, kernel_args: list[str]) -> str | None:
        """A write just past the end of an argument (into the slack before its guard zone), if any."""
        for base, region in self._regions.items():
            where = region.overrun()
            if where is not None:
                names = " and ".join(kernel_args[i] for i in self._users[base])
                return f"a write {where} {names} ({region.nbytes} bytes bound)"
        return None

    def snapshot(self) -> dict[int, bytes]:
        return {base: region.contents() for base, region in self._regions.items()}

    def reload(self) -> None:
        """Back to the arguments' contents before the dispatch (for a second run)."""
        for region in self._regions.values():
            region.reload()

    def first_difference(self, snapshot: dict[int, bytes], kernel_args: list[str]) -> str | None:
        """Where the current contents differ from `snapshot`, named by argument and element."""
        for base, region in self._regions.items():
            now = region.contents()
            if now == snapshot[base]:
                continue
            before = np.frombuffer(snapshot[base], dtype=np.uint8)
            offset = int(np.argmax(np.frombuffer(now, dtype=np.uint8) != before))
            for i in self._users[base]:
                if i in self._constants:
                    continue
                t = self._tensors[i]
                start = t.data_ptr() - region.source
                element = (offset - start) // t.element_size()
                if 0 <= element < t.numel():
                    return f"{kernel_args[i]}, element {element} of {t.numel()}"
            return f"{' / '.join(kernel_args[i] for i in self._users[base])}, byte {offset}"
        return None

    def release(self, write_back: bool = True) -> None:
        for region in self._regions.values():
            region.release(write_back)
        self._regions.clear()
