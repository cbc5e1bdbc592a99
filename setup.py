"""Builds the optional CUDA extension `coconut_fast._C` from csrc/ when torch has CUDA; skips it otherwise.

The package works without the extension. With build isolation, torch is not importable while
building, so the extension is skipped: build it with `pip install -e . --no-build-isolation`
in an environment whose torch has CUDA. Architectures: TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX": SASS for
A100 and H100, and sm_90 PTX that the driver compiles for newer GPUs.
"""
import glob
import os

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "-std=c++17"]  # benchmarks/compiled_kernels.py checks these
HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    """((extension, build_ext class), message) when the extension can be built here, else (None, why not)."""
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu"))
                     + glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return None, f"torch {torch.__version__} has no CUDA"
    if not sources:
        return None, "no CUDA sources in csrc/"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # read by BuildExtension when it compiles
    ext = cpp_extension.CUDAExtension(
        "coconut_fast._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
    )
    return (ext, cpp_extension.BuildExtension), f"building coconut_fast._C for TORCH_CUDA_ARCH_LIST={arch}"


if __name__ == "__main__":
    built, message = cuda_extension()
    if built is None:
        print(f"coconut_fast: skipping the CUDA extension coconut_fast._C: {message}; the package works without it")
        setup()
    else:
        print(f"coconut_fast: {message}")
        ext, build_ext = built
        setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
