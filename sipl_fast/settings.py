"""Every environment setting sipl_fast reads at run time, read here and only when asked for.

Nothing is read at import: a variable set after ``import sipl_fast`` takes effect on the next
call that consults it. Two variables are ours; the build reads its own in ``setup.py``.

==========================  ==========================  ==========================================
variable                    values                      effect
==========================  ==========================  ==========================================
``SIPL_FAST_BACKEND``       ``auto`` (default),         which implementation the ops run
                            ``reference``, ``torch``,   (``sipl_fast.use_backend`` overrides it
                            ``triton``                  inside a block)
``SIPL_FAST_KERNELS``       ``auto`` (default),         on CUDA, the triton backend runs the
                            ``all``, ``op[,op...]``     torch formulation where a kernel measured
                                                        slower; ``all`` or named ops run the
                                                        kernels anyway (``ops.kernels_forced``
                                                        inside a block)
``TRITON_INTERPRET``        ``1``                       Triton's own: kernels run on the CPU in
                                                        its interpreter (the test suite sets it)
==========================  ==========================  ==========================================
"""
from __future__ import annotations

import os

BACKEND_VARIABLE = "SIPL_FAST_BACKEND"
KERNELS_VARIABLE = "SIPL_FAST_KERNELS"
BACKENDS = ("reference", "torch", "triton")
BACKEND_CHOICES = BACKENDS + ("auto",)


class SettingError(ValueError):
    """An environment variable of sipl_fast holds a value it does not accept."""


def check_backend(name: str, source: str = "backend") -> str:
    """``name`` if it names a backend or ``auto``; one clear error otherwise."""
    if name not in BACKEND_CHOICES:
        raise SettingError(f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


def backend() -> str:
    """The backend ``SIPL_FAST_BACKEND`` asks for (``auto`` when unset)."""
    return check_backend(os.environ.get(BACKEND_VARIABLE, "auto").strip() or "auto", BACKEND_VARIABLE)


def forced_kernels(ops_with_kernels) -> frozenset[str]:
    """The ops whose kernels ``SIPL_FAST_KERNELS`` forces: none for ``auto`` (or unset), every op
    of ``ops_with_kernels`` for ``all``, else the comma-separated names (each must be one of
    ``ops_with_kernels``)."""
    value = os.environ.get(KERNELS_VARIABLE, "auto").strip()
    if value in ("", "auto"):
        return frozenset()
    if value == "all":
        return frozenset(ops_with_kernels)
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = names - set(ops_with_kernels)
    if unknown:
        raise SettingError(f"{KERNELS_VARIABLE}={value!r}: no kernels for {sorted(unknown)}; use auto, all "
                           f"or a comma-separated list of {sorted(ops_with_kernels)}")
    return names


def triton_interpreter() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``). Triton reads
    the variable when its kernels are defined, so a kernel module keeps the value it was
    imported with."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
