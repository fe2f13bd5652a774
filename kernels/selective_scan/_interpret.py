"""Let Triton's CPU interpreter (TRITON_INTERPRET=1) run loops with a runtime trip count.

The kernels loop with ``tl.range(0, n, num_stages=...)`` so that the GPU compiler pipelines their
loads. The interpreter maps ``tl.range`` to Python's ``range``, which calls ``__index__`` on the bound;
the interpreter holds every scalar as a one-element array and converts it with ``int(array)``, which
numpy 2 refuses for arrays of one dimension. This wraps the interpreter's tensor patching so that
``__index__`` reads the single element (``int(array.item())``); any other conversion behaves as before
(an array of several elements still raises).

Applied once, on import, only when TRITON_INTERPRET=1; nothing changes on a GPU.
"""

from __future__ import annotations

import os


def install() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton without its interpreter
        return
    original = interpreter._patch_lang_tensor
    if getattr(original, "_ssm_suite_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor._ssm_suite_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


install()
