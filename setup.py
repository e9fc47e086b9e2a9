"""Build of sipl_fast and its extension sipl_fast._C.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed: the
extension is compiled against the torch you run, so the build must not fetch another one).

Environment:
  SIPL_FAST_CUDA=0        build the C++ (CPU) ops only
  FORCE_CUDA=1            insist on the CUDA sources; fail with a clear message if impossible
  TORCH_CUDA_ARCH_LIST    GPU architectures (default when no GPU is visible: 8.0;9.0+PTX)
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja driver)
  NVCC_THREADS            nvcc --threads (default 2)
By default the CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit with
cuda_runtime.h is found; a GPU is not needed to compile them.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised by users without torch
    sys.exit(
        "sipl_fast: torch must be installed before building (pip install torch), and the build "
        "must see it: pip install --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _toolkit_root() -> str | None:
    """A CUDA toolkit root holding include/cuda_runtime.h, or None.

    torch guesses CUDA_HOME from the nvcc on PATH; where that nvcc is a wrapper script the
    guess points at the wrong folder, so every candidate is checked for the runtime header.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda"]
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.realpath(root)
    return None


def _want_cuda() -> tuple[bool, str]:
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if os.environ.get("SIPL_FAST_CUDA", "auto") == "0" and not force:
        return False, "SIPL_FAST_CUDA=0"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif _toolkit_root() is None:
        reason = "no CUDA toolkit with include/cuda_runtime.h found (set CUDA_HOME)"
    else:
        return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {_toolkit_root()}"
    if force:
        sys.exit(f"sipl_fast: FORCE_CUDA=1 but the CUDA sources cannot be built: {reason}")
    return False, reason


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    with_cuda, reason = _want_cuda()
    # -fopenmp: at::parallel_for is inline OpenMP; its runtime comes with torch (libgomp).
    cxx_flags = ["-O3", "-fopenmp"]
    print(f"sipl_fast: building {'C++ and CUDA' if with_cuda else 'C++ only'} ops ({reason})")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "sipl_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True
        ), False
    root = _toolkit_root()
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root  # torch read its guess at import; correct it
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a visible GPU torch cannot derive the list and crashes (IndexError).
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    print(f"sipl_fast: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(from the visible GPU)')}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2"), "-DSIPL_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "sipl_fast._C", sources, define_macros=[("SIPL_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, py_limited_api=True,
    ), True


def _write_build_info(with_cuda: bool) -> None:
    """Record what the extension was built against; checked when it is loaded."""
    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
    }
    with open(os.path.join(HERE, "sipl_fast", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


ext, with_cuda = _extension()
_write_build_info(with_cuda)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
