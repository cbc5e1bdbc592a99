"""The CUDA extension's build: the sources compile (nvcc for the kernels, the host compiler against torch's headers
for the bindings), setup.py skips the build cleanly on a CPU torch and targets sm_80 / sm_90 (+ sm_90 PTX) or the
user's list, and the engine names the missing extension. The kernels themselves are tested beside their Triton
twins."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from coconut_fast.engine.layers import select_kernels
from coconut_fast.kernels import cuda_kernels_available, paged_decode_attention_cuda, write_kv_cuda

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compiled_kernels  # noqa: E402  (nvcc and setup.py helpers shared with test_kernels_compiled.py)

CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit whose headers the host compiler can use (torch's guess, then the usual place)."""
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home)
    return None


CUDA_HOME = find_cuda_home()


def test_the_extension_has_its_kernels():
    assert {p.name for p in KERNEL_SOURCES} == {"paged_decode_attention.cu", "kv_write.cu", "latent_feedback.cu"}
    assert (CSRC / "bindings.cpp").exists() and (CSRC / "coconut_kernels.h").exists()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_sources_compile_with_nvcc(source):
    """The .cu files include no torch header, so the local nvcc compiles them for sm_80 and sm_90 without CUDA torch,
    with the build's flags and warnings as errors (the same compile, cached, that test_kernels_compiled.py checks for
    spills)."""
    result = compiled_kernels.nvcc_compile(source)
    assert result["returncode"] == 0, result["log"][-3000:]
    assert result["built"]


@pytest.mark.skipif(CXX is None or CUDA_HOME is None, reason="needs a C++ compiler and the CUDA headers")
def test_bindings_compile_against_torch_headers(tmp_path):
    """bindings.cpp against the installed torch's headers (syntax and types; linking needs a CUDA torch). A CPU
    torch lacks one generated CUDA config header; an empty stand-in takes its place for this check only."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [tmp_path, *include_paths(), CUDA_HOME / "include", sysconfig.get_paths()["include"], CSRC]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-Wno-c++20-extensions",
           *[f"-I{p}" for p in includes], str(CSRC / "bindings.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch path")
def test_setup_skips_the_extension_on_cpu_torch():
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = [line for line in result.stdout.splitlines() if "skipping the CUDA extension" in line]
    assert skipped == [f"coconut_fast: skipping the CUDA extension coconut_fast._C: torch {torch.__version__} has "
                       "no CUDA; the package works without it"]
    assert "coconut-fast" in result.stdout


@pytest.mark.parametrize("arch_list, expected", [(None, "8.0;9.0+PTX"), ("9.0", "9.0"), ("8.6;9.0", "8.6;9.0")])
def test_setup_targets_sm80_sm90_ptx_or_the_users_list(monkeypatch, arch_list, expected):
    """With a CUDA torch (simulated: version and CUDA_HOME) setup.py builds every csrc source into coconut_fast._C,
    by default as sm_80 and sm_90 code plus sm_90 PTX, so GPUs newer than sm_90 load it too."""
    from torch.utils import cpp_extension

    setup_module = compiled_kernels.load_setup_module()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(CUDA_HOME or "/usr/local/cuda"))
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    built, message = setup_module.cuda_extension()
    ext, build_ext = built
    assert ext.name == "coconut_fast._C" and build_ext is cpp_extension.BuildExtension
    assert sorted(ext.sources) == sorted(f"csrc/{p.name}" for p in [*KERNEL_SOURCES, CSRC / "bindings.cpp"])
    assert message.endswith(f"TORCH_CUDA_ARCH_LIST={expected}")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


@pytest.mark.skipif(cuda_kernels_available(), reason="checks the errors without the extension")
def test_without_the_extension_the_cuda_kernels_are_a_clear_error():
    with pytest.raises(ValueError, match=r"kernels='cuda' needs the compiled extension coconut_fast\._C"):
        select_kernels("cuda")
    k = torch.randn(2, 1, 16)
    cache = torch.zeros(2, 4, 1, 16)
    with pytest.raises(RuntimeError, match=r"coconut_fast\._C|CUDA tensors"):
        write_kv_cuda(k, k, cache, cache.clone(), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"coconut_fast\._C|CUDA tensors"):
        paged_decode_attention_cuda(torch.randn(1, 2, 16), cache, cache.clone(), torch.zeros(1, 1, dtype=torch.int32),
                                    torch.ones(1, dtype=torch.int32), 0.25)


@pytest.mark.skipif(not cuda_kernels_available(), reason="needs coconut_fast._C and a CUDA device")
def test_unsupported_shapes_are_named_on_the_gpu():
    cache = torch.zeros(2, 16, 1, 48, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention_cuda(torch.randn(1, 2, 48, device="cuda"), cache, cache.clone(),
                                    torch.zeros(1, 1, dtype=torch.int32, device="cuda"),
                                    torch.ones(1, dtype=torch.int32, device="cuda"), 0.1)
