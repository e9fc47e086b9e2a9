"""sipl_fast: SIPL (Self-Improved Privilege Learning) on PromptIR with fused kernels.

    from sipl_fast import SIPLPromptIR
    model = SIPLPromptIR()                    # the authors' configuration
    restored = model.refine(degraded, steps=2)

Also ``SIPLAdaIR`` (AdaIR with Proxy Fusion) and ``PromptIR`` (the plain baseline, no refinement).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import BACKENDS, requested_backend, resolve_backend, use_backend
from .ops import extension as _extension
from .ops.extension import step_delta

HAS_EXT = _extension.LOADED


def info() -> dict:
    """Build and backend report: extension, CUDA kernels, arch list, Triton, backends."""
    import torch

    from .backends import triton_available, triton_interpreter

    report = {
        "sipl_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension_loaded": _extension.LOADED,
        "extension_error": _extension.LOAD_ERROR,
        "cuda_kernels_compiled": _extension.built_with_cuda(),
        "arch_list": _extension.BUILD_INFO.get("arch_list", ""),
        "built_against_torch": _extension.BUILD_INFO.get("torch_version"),
        "triton_available": triton_available(),
        "triton_interpreter": triton_interpreter(),
        "backends": list(BACKENDS),
        "backend_requested": requested_backend(),
        "backend_cpu": resolve_backend(torch.device("cpu")),
        "backend_cuda": resolve_backend(torch.device("cuda")),
    }
    return report


def __getattr__(name):
    # The model pulls in every module; import it on first use so `import sipl_fast` stays light.
    if name == "SIPLPromptIR":
        from .model import SIPLPromptIR
        return SIPLPromptIR
    if name == "SIPLAdaIR":
        from .adair import SIPLAdaIR
        return SIPLAdaIR
    if name == "PromptIR":
        from .model import PromptIR
        return PromptIR
    raise AttributeError(f"module 'sipl_fast' has no attribute {name!r}")


__all__ = ["SIPLPromptIR", "SIPLAdaIR", "PromptIR", "use_backend", "info", "step_delta", "BACKENDS", "HAS_EXT"]
