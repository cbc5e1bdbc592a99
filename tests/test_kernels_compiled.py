"""Every kernel compiled for sm_80 and sm_90 on this machine, no GPU needed (benchmarks/compiled_kernels.py): what
triton's interpreter accepts but its compiler rejects, shared memory over a target's limit, tl.dot fed other types
than the inputs', and CUDA kernels whose registers spill.

The Triton kernels compile in a subprocess (the kernels here were defined in interpreter mode) while nvcc compiles
the CUDA sources. By default one case per kernel and dtype (about a minute on 2 cores); COCONUT_COMPILE_ALL=1
compiles every combination of the engine's shapes (about 10 CPU-minutes). Run with -s to see the per-kernel table.
"""
import itertools
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compiled_kernels as ck  # noqa: E402
from coconut_fast.kernels._common import HAS_TRITON  # noqa: E402

FULL = os.environ.get("COCONUT_COMPILE_ALL") == "1"
CASES = ck.triton_cases(FULL)
SOURCES = sorted(ck.CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
ATTENTION_DTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def compiles(request):
    """The Triton compiles (a subprocess) and nvcc (a thread) started together, so they overlap; each only when a
    selected test needs it."""
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    triton = None
    if HAS_TRITON and "test_triton_kernel_compiles_within_shared_memory" in selected:
        triton = ck.compile_triton_in_subprocess(FULL)
    pool = ThreadPoolExecutor(1)
    cuda = None
    if NVCC is not None and "test_cuda_kernels_compile_without_spills" in selected:
        cuda = pool.submit(ck.compile_cuda_sources, SOURCES)
    yield SimpleNamespace(triton=triton, cuda=cuda)
    if triton is not None and triton.poll() is None:
        triton.kill()
        triton.communicate()
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def triton_records(compiles):
    stdout, stderr = compiles.triton.communicate()
    assert compiles.triton.returncode == 0, stderr[-4000:]
    records = json.loads(stdout)
    print("\n" + ck.triton_table(records))
    return records


@pytest.fixture(scope="module")
def cuda_results(compiles):
    results = compiles.cuda.result()
    print("\n" + ck.cuda_table(results))
    return results


def over_shared_limit(records: list[dict]) -> list[str]:
    return [f"{r['kernel']} {r['arch']}: {r['shared_bytes']} bytes > {r['shared_limit_bytes']}"
            for r in records if r["shared_bytes"] > r["shared_limit_bytes"]]


def spilled(kernels: list[dict]) -> list[str]:
    return [f"{k['kernel']} {k['arch']}: {k['spill_stores']} bytes spill stores" for k in kernels
            if k.get("spill_stores", 0) > 0]


@needs_triton
@pytest.mark.parametrize("arch", list(ck.TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[ck.case_id(*c) for c in CASES])
def test_triton_kernel_compiles_within_shared_memory(triton_records, case, arch):
    records = [r for r in triton_records if r["case"] == ck.case_id(*case) and r["arch"] == arch]
    assert records, "the wrapper launched no kernel"
    errors = [f"{r['kernel']}: {r['error']}" for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    assert not over_shared_limit(records)
    kernel, dtype, _ = case
    for r in records:
        if r["kernel"] in ck.ATTENTION_KERNELS:  # tl.dot in the input dtype; never tf32
            assert r["dot_count"] == 2 and r["dot_operand_types"] == [ATTENTION_DTYPES[dtype]], r
            assert not r["dot_tf32"]
            assert r["tensor_cores"] == (dtype != "fp32")  # float32: ieee, FMA loops


@needs_nvcc
@pytest.mark.parametrize("arch", list(ck.TARGETS))
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile_without_spills(cuda_results, source, arch):
    result = cuda_results[source.name]
    assert result["returncode"] == 0 and result["built"], result["log"][-3000:]
    kernels = [k for k in result["kernels"] if k["arch"] == arch]
    assert kernels and all("registers" in k and "spill_stores" in k for k in kernels), result["log"][-3000:]
    assert not spilled(kernels)
    assert all(k["shared_bytes"] <= 48 * 1024 for k in kernels)  # static shared memory


PTXAS_LOG = """ptxas info    : Compiling entry function '_Z6kernelILi64EEvPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelILi64EEvPf
    24 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8256 bytes smem, 536 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelILi64EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi64EEvPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_ptxas_report_parsing_finds_spills():
    kernels = ck.parse_ptxas(PTXAS_LOG)
    assert [(k["arch"], k["registers"], k["shared_bytes"], k["spill_stores"]) for k in kernels] == [
        ("sm_80", 255, 8256, 16), ("sm_90", 40, 0, 0)]
    assert kernels[0]["kernel"] in ("void kernel<64>(float*)", "_Z6kernelILi64EEvPf")
    assert spilled(kernels) == [f"{kernels[0]['kernel']} sm_80: 16 bytes spill stores"]


def test_shared_memory_limits_are_the_targets():
    assert {arch: limit for arch, (_, limit) in ck.TARGETS.items()} == {"sm_80": 166912, "sm_90": 232448}
    record = {"kernel": "k", "arch": "sm_80", "shared_bytes": 166913, "shared_limit_bytes": 166912}
    assert over_shared_limit([record]) and not over_shared_limit([{**record, "shared_bytes": 166912}])


def test_nvcc_builds_as_setup_py_does(tmp_path):
    cmd = ck.nvcc_command(ck.CSRC / "kv_write.cu", tmp_path / "k.o")
    flags = ck.load_setup_module().NVCC_FLAGS
    assert cmd[1:1 + len(flags)] == flags and "-Xptxas" in cmd and cmd[cmd.index("-Xptxas") + 1] == "-v"
    assert [cmd[i + 1] for i, f in enumerate(cmd) if f == "-gencode"] == ["arch=compute_80,code=sm_80",
                                                                         "arch=compute_90,code=sm_90"]


def test_every_wrapper_and_dtype_is_a_case():
    assert {(kernel, dtype) for kernel, dtype, _ in CASES} == {(k, d) for k in ck.AXES for d in ck.DTYPES}
    full = ck.triton_cases(full=True)
    assert len(full) == sum(3 * len(list(itertools.product(*axes.values()))) for axes in ck.AXES.values())
    for kernel, axes in ck.AXES.items():  # the subset still sees every block size, group and model
        for name, values in axes.items():
            if name != "head_dim":
                assert {c[2][name] for c in CASES if c[0] == kernel} == set(values), (kernel, name)
