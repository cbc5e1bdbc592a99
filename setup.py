"""Builds the optional CUDA extension `coconut_fast._C` from csrc/ when torch has CUDA; skips it otherwise.

The package works without the extension. With build isolation, torch is not importable while
building, so the extension is skipped: build it with `pip install -e . --no-build-isolation`
in an environment whose torch has CUDA.
"""
import glob
import os

from setuptools import setup


def cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None or CUDA_HOME is None:
        return None, f"torch {torch.__version__} has no CUDA"
    if not sources:
        return None, "no CUDA sources in csrc/"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext = CUDAExtension(
        "coconut_fast._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return (ext, BuildExtension), f"building coconut_fast._C for TORCH_CUDA_ARCH_LIST={arch}"


built, message = cuda_extension()
if built is None:
    print(f"coconut_fast: skipping the CUDA extension coconut_fast._C: {message}; the package works without it")
    setup()
else:
    print(f"coconut_fast: {message}")
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
