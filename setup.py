"""Builds jumprelu_ext._C: CUDA + CPU kernels when a CUDA toolkit is found, CPU-only otherwise.

FORCE_CUDA=1 / FORCE_CPU=1 override the detection. Install with
`pip install --no-build-isolation .` after torch, so the extension is compiled against
the torch you run.
"""

import glob
import os

from setuptools import find_packages, setup

# /usr/local/bin/nvcc may be a wrapper script, from which torch would guess
# CUDA_HOME=/usr/local and then fail to find libcudart: prefer the real toolkit.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def build_cuda() -> bool:
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def library_header_dirs():
    """torch's CUDA headers include cuBLAS/cuSPARSE headers, which a bare toolkit may lack;
    pip's CUDA torch ships them in site-packages/nvidia/*/include. Searched after the
    toolkit's own headers (-isystem), so they only fill gaps."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    headers = (glob.glob(os.path.join(base, "*", "include", "cusparse.h")) for base in nvidia.__path__)
    return sorted({os.path.dirname(h) for found in headers for h in found})


def extension():
    sources = ["csrc/module.cpp", "csrc/schemas.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is OpenMP inside the headers, so without it the CPU
    # kernels run on one thread. -fno-trapping-math lets gcc vectorise the comparisons;
    # it changes no result.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
    if not build_cuda():
        # py_limited_api: _C only creates an empty module, so one build serves every CPython >= 3.10.
        return CppExtension(
            "jumprelu_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # Without a visible GPU torch cannot pick architectures itself.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    system_includes = [flag for d in library_header_dirs() for flag in ("-isystem", d)]
    return CUDAExtension(
        "jumprelu_ext._C",
        # forward.cu and backward.cu compile in parallel (MAX_JOBS); register_cuda.cpp is plain C++.
        sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
        extra_compile_args={"cxx": cxx_flags + system_includes, "nvcc": ["-O3", "-lineinfo"] + system_includes},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["jumprelu_ext", "jumprelu_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
