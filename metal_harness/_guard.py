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


def enabled() -> bool:
    return os.environ.get("METAL_HARNESS_GUARD", "1") != "0"


class _Region:
    def __init__(self, source: int, nbytes: int, dll: ctypes.CDLL):
        self.source = source
        self.nbytes = nbytes
        self._dll = dll
        self._mapping = ctypes.c_void_p()
        self._mapping_size = ctypes.c_size_t()
        start = dll.mh_guarded_alloc(nbytes, GUARD_BYTES, ctypes.byref(self._mapping), ctypes.byref(self._mapping_size))
        if not start:
            raise MemoryError(f"cannot map a guarded buffer of {nbytes} bytes")
        self.start = start
        ctypes.memmove(start, source, nbytes)

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

    def __init__(self, dll: ctypes.CDLL, tensors: dict[int, torch.Tensor]):
        self._tensors = tensors
        self._regions: dict[int, _Region] = {}  # storage address -> region
        self._users: dict[int, list[int]] = {}
        if not enabled():
            return
        by_storage: dict[int, list[int]] = {}
        for i, t in tensors.items():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(i)
        for base, users in by_storage.items():
            storage = tensors[users[0]].untyped_storage()
            first = min(tensors[i].data_ptr() for i in users)
            self._regions[base] = _Region(first, base + storage.nbytes() - first, dll)
            self._users[base] = users

    def pointer(self, i: int) -> int:
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
