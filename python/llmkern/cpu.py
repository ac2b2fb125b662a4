"""The C++ CPU backend of the llmkern:: ops (csrc/), as the dispatcher (llmkern._dispatch) sees it.

    kernel(name) -> Callable | None

name is the op's name without the "llmkern::" namespace ("attention", "paged_decode_attention", "rms_norm", ...).
The callable takes exactly the op's schema arguments, positionally, and returns what the op returns (a mutating op
mutates its arguments and returns None); the dispatcher has already run the op's value checks. None means "no C++
implementation of this op here" (not written, not built, or not available on this machine), and always when the
environment sets LLMKERN_CPU_BACKEND=reference: CPU tensors then run llmkern.reference. The dispatcher calls
kernel() on every CPU call that does not go to the Triton interpreter, so it must be cheap after its first call.

This module is the interface only: no op has a C++ implementation yet, so kernel() returns None for every op.
"""
from __future__ import annotations

from typing import Callable, Optional


def kernel(name: str) -> Optional[Callable]:
    """The C++ CPU implementation of llmkern::<name>, or None (module docstring)."""
    return None
