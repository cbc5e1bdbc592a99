"""Every kernel compiled for the GPUs the engine targets, on a machine without one: the Triton kernels through
`triton.compile` for sm_80 and sm_90 (shared memory against the target's limit, registers, local memory, the types
`tl.dot` takes), the CUDA sources through `nvcc -Xptxas -v` (registers, shared memory, spills per kernel).

    python benchmarks/compiled_kernels.py [--all] [--out PATH]   # benchmarks/results/cpu-compiled-kernels-<date>.json

The Triton launches are the ones the kernel wrappers make: each case calls a wrapper on small CPU tensors of the
engine's shapes (dtypes, head dims 64 and 128, cache blocks of 16 and 32, GQA groups 1/4/8, the model shapes below)
with the launch recorded instead of run. `--all` (tests: COCONUT_COMPILE_ALL=1) compiles every combination, about
10 CPU-minutes; without it one case per kernel and dtype (see `triton_cases`). tests/test_kernels_compiled.py runs
the same functions.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# shared memory one block may use (with the opt-in attribute): A100 163 KiB, H100 227 KiB
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
DTYPES = ("fp32", "fp16", "bf16")
MODELS = {  # hidden, query heads, kv heads, head_dim, norm
    "gpt2-124m": (768, 12, 12, 64, "layer"),
    "llama-1b": (2048, 32, 8, 64, "rms"),
    "llama-8b": (4096, 32, 8, 128, "rms"),
}
ATTENTION = dict(head_dim=(64, 128), block_size=(16, 32), group=(1, 4, 8))
AXES = {
    "decode_attention": dict(**ATTENTION, num_splits=(1, 4)),
    # the step's k/v appended in the launch (rope: rotated first); split 4 merges in the launch through counters
    "decode_attention_append": dict(**ATTENTION, num_splits=(4, 1), rope=(True, False)),
    "prefill_attention": ATTENTION,
    "write_kv": dict(model=tuple(MODELS), block_size=(16, 32)),
    "rope_write_kv": dict(model=("llama-1b", "llama-8b"), block_size=(16, 32)),
    "add_norm": dict(model=tuple(MODELS), residual=(True, False)),
    "latent_feedback": dict(model=tuple(MODELS), block_size=(16, 32)),
    # rows 1: split-K through the workspace (split_k_for); rows 64: one split, 64-row tiles (linear_act)
    "linear_act": dict(model=tuple(MODELS), act=("none", "gelu_tanh", "silu_mul"), rows=(1, 64)),
    "linear_add_norm": dict(model=tuple(MODELS), mlp=(False, True), rows=(1, 64)),
}
INTERMEDIATE = {"gpt2-124m": 3072, "llama-1b": 8192, "llama-8b": 14336}  # MLP widths of the fused-linear cases
ATTENTION_KERNELS = ("_decode_kernel", "_prefill_kernel")


def case_id(kernel: str, dtype: str, params: dict) -> str:
    return "-".join([kernel, dtype, *(f"{k}{v}" for k, v in params.items())])


def triton_cases(full: bool = False) -> list[tuple[str, str, dict]]:
    """(wrapper, dtype, params): every combination, or one per wrapper and dtype: the largest head dim (the largest
    tiles) and the other axes rotating over the dtypes, so each of their values appears. The exception: float32
    prefill at head dim 128 (about 35 s of compile per arch for the parity-only float32 path) is left to `full`."""
    cases = []
    for kernel, axes in AXES.items():
        names, values = list(axes), list(axes.values())
        for d, dtype in enumerate(DTYPES):
            if full:
                cases += [(kernel, dtype, dict(zip(names, combo))) for combo in itertools.product(*values)]
                continue
            params = {name: v[d % len(v)] for name, v in axes.items()}
            if "head_dim" in params:
                params["head_dim"] = 64 if (kernel, dtype) == ("prefill_attention", "fp32") else max(axes["head_dim"])
            cases.append((kernel, dtype, params))
    return cases


# ---------------------------------------------------------------- recording the wrappers' launches
def call_wrapper(kernel: str, dtype_name: str, params: dict) -> None:
    """Call the kernel wrapper on small CPU tensors of the case's shapes (sizes > 1, so no argument is
    specialised to 1 as in a real run would not be)."""
    import torch

    from coconut_fast import kernels as K

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    rows, blocks = 3, 5
    if kernel in ("decode_attention", "decode_attention_append", "prefill_attention"):
        kv_heads, head_dim, bs = 2, params["head_dim"], params["block_size"]
        q = torch.randn(rows, kv_heads * params["group"], head_dim).to(dtype)
        cache = torch.randn(rows * blocks, bs, kv_heads, head_dim).to(dtype)
        tables = torch.arange(rows * blocks, dtype=torch.int32).view(rows, blocks)
        lens = torch.full((rows,), 2 * bs, dtype=torch.int32)
        if kernel == "decode_attention":
            K.paged_decode_attention(q, cache, cache.clone(), tables, lens, 0.1, num_splits=params["num_splits"])
        elif kernel == "decode_attention_append":  # q, k, v as strided views of one fused projection, as the engine
            qkv = torch.randn(rows, q.shape[1] + 2 * kv_heads, head_dim).to(dtype)
            q, k, v = qkv.split([q.shape[1], kv_heads, kv_heads], dim=1)
            slots = (tables[:, 1] * bs + bs - 1).long()
            table = torch.randn(64, head_dim // 2)
            rope = (torch.arange(rows) + 2, table, table.clone()) if params["rope"] else None
            K.paged_decode_attention(q, cache, cache.clone(), tables, lens, 0.1, num_splits=params["num_splits"],
                                     new_kv=(k, v, slots), rope=rope)
        else:
            cu = torch.arange(rows + 1, dtype=torch.int32)
            K.paged_prefill_attention(q, cache, cache.clone(), tables, cu, lens, 0.1)
        return
    hidden, heads, kv_heads, head_dim, norm = MODELS[params["model"]]
    if kernel in ("linear_act", "linear_add_norm"):
        call_fused_linear(kernel, dtype, params)
        return
    if kernel in ("write_kv", "rope_write_kv"):
        bs = params["block_size"]
        k = torch.randn(rows, kv_heads, head_dim).to(dtype)
        cache = torch.randn(blocks, bs, kv_heads, head_dim).to(dtype)
        slots = torch.arange(rows, dtype=torch.int64) * 3
        if kernel == "write_kv":
            K.write_kv(k, k.clone(), cache, cache.clone(), slots)
        else:
            q = torch.randn(rows, heads, head_dim).to(dtype)
            table = torch.randn(64, head_dim // 2)
            K.rope_write_kv(q, k, k.clone(), cache, cache.clone(), slots, torch.arange(rows) + 2, table, table.clone())
        return
    x = torch.randn(rows, hidden).to(dtype)
    weight, bias = torch.ones(hidden).to(dtype), (torch.zeros(hidden).to(dtype) if norm == "layer" else None)
    if kernel == "add_norm":
        residual = x.clone() if params["residual"] else None
        if norm == "rms":
            K.add_rms_norm(x, residual, weight, 1e-5)
        else:
            K.add_layer_norm(x, residual, weight, bias, 1e-5)
        return
    positions = torch.arange(rows, dtype=torch.int64) + 2
    K.latent_feedback(x, x.clone(), weight, bias, 1e-5, norm == "rms", torch.empty_like(x), torch.empty_like(x),
                      positions, (positions + 1).to(torch.int32), positions.clone(),
                      torch.arange(rows * 8, dtype=torch.int32).view(rows, 8), params["block_size"])


def call_fused_linear(kernel: str, dtype, params: dict) -> None:
    """The model's projections: linear_act on qkv ("none"), the GPT-2 MLP input ("gelu_tanh", Conv1D layout) or
    the fused gate/up ("silu_mul"); linear_add_norm on o_proj (mlp False) or the MLP output. The weights are
    never read (torch.empty: the pages of the large ones are not touched)."""
    import torch

    from coconut_fast import kernels as K

    hidden, heads, kv_heads, head_dim, norm = MODELS[params["model"]]
    gpt2 = norm == "layer"
    layout = "kn" if gpt2 else "nk"
    inner = INTERMEDIATE[params["model"]]
    rows = params["rows"]
    if kernel == "linear_act":
        act = params["act"]
        n = {"none": (heads + 2 * kv_heads) * head_dim, "gelu_tanh": inner, "silu_mul": 2 * inner}[act]
        layout = "kn" if act == "gelu_tanh" else layout
        x = torch.randn(rows, hidden).to(dtype)
        weight = torch.empty((hidden, n) if layout == "kn" else (n, hidden), dtype=dtype)
        K.linear_act(x, weight, torch.zeros(n, dtype=dtype) if gpt2 else None, act, weight_layout=layout)
        return
    k = inner if params["mlp"] else hidden
    x = torch.randn(rows, k).to(dtype)
    weight = torch.empty((k, hidden) if layout == "kn" else (hidden, k), dtype=dtype)
    residual = torch.randn(rows, hidden).to(dtype)
    bias = torch.zeros(hidden, dtype=dtype) if gpt2 else None
    K.linear_add_norm(x, weight, bias, residual, torch.ones(hidden, dtype=dtype), bias, 1e-5, not gpt2,
                      weight_layout=layout)


def record_launches(kernel: str, dtype: str, params: dict) -> list[tuple]:
    """The (JITFunction, args, kwargs) of every launch the wrapper makes, recorded instead of run."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda fn, grid: (lambda *args, **kwargs: launches.append((fn, args, kwargs)))
    try:
        call_wrapper(kernel, dtype, params)
    finally:
        JITFunction.__getitem__ = original
    return launches


# ---------------------------------------------------------------- compiling the Triton kernels
def triton_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL of a cubin from cuobjdump -res-usage (a stack frame > 0: registers spilled)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(usage.get("REG", -1)), "stack_bytes": int(usage.get("STACK", -1)),
            "local_bytes": int(usage.get("LOCAL", -1))}


def dot_operands(ttir: str, ttgir: str) -> dict:
    """The element types of every tl.dot's operands, whether any asks for tf32, and whether the dots run on the
    tensor cores (an mma layout) or as FMA loops."""
    types = re.findall(r"tt\.dot [^:]*: tensor<[0-9x]+x(\w+)> \* tensor<[0-9x]+x(\w+)>", ttir)
    return {"dot_operand_types": sorted({t for pair in types for t in pair}), "dot_count": len(types),
            "dot_tf32": "inputPrecision = tf32" in ttir, "tensor_cores": "mma" in ttgir}


def compile_launch(fn, args, kwargs, arch: str) -> dict:
    """triton.compile of one recorded launch for `arch`, as the JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    cc, limit = TARGETS[arch]
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    bound, specialization, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization, opts)
    record = {"kernel": fn.__name__, "arch": arch, "shared_limit_bytes": limit}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as error:  # the compiler's rejection is the finding
        return {**record, "error": f"{type(error).__name__}: {error}"[:2000]}
    meta = compiled.metadata
    return {**record, "compile_s": round(time.perf_counter() - start, 2), "shared_bytes": meta.shared,
            "num_warps": meta.num_warps, "num_stages": meta.num_stages, **resource_usage(compiled.asm["cubin"]),
            **dot_operands(compiled.asm["ttir"], compiled.asm["ttgir"])}


_JOBS: list = []  # (case id, dtype, fn, args, kwargs, arch), filled before the workers fork


def _compile_job(index: int) -> dict:
    case, dtype, fn, args, kwargs, arch = _JOBS[index]
    return {"case": case, "dtype": dtype, **compile_launch(fn, args, kwargs, arch)}


def compile_triton_kernels(full: bool = False, workers: int | None = None) -> list[dict]:
    """One record per (case, launch, arch). Run it where triton is not in interpreter mode (the kernels must be
    JITFunctions); the wrappers are called with TRITON_INTERPRET=1 only so they accept CPU tensors."""
    from triton.runtime.jit import JITFunction

    from coconut_fast.kernels.latent_feedback import _latent_feedback_kernel

    if not isinstance(_latent_feedback_kernel, JITFunction):
        raise RuntimeError("the kernels were defined in triton's interpreter mode: run without TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"
    _JOBS.clear()
    for kernel, dtype, params in triton_cases(full):
        for fn, args, kwargs in record_launches(kernel, dtype, params):
            _JOBS.extend((case_id(kernel, dtype, params), dtype, fn, args, kwargs, arch) for arch in TARGETS)
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    if workers == 1:
        return [_compile_job(i) for i in range(len(_JOBS))]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, range(len(_JOBS)), chunksize=1))


def compile_triton_in_subprocess(full: bool = False) -> subprocess.Popen:
    """Start compile_triton_kernels in a fresh interpreter (no TRITON_INTERPRET); `.communicate()` gives JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, said quietly
    cmd = [sys.executable, str(Path(__file__).resolve()), "--triton-json", *(["--all"] if full else [])]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- compiling the CUDA sources
def load_setup_module():
    """setup.py as a module (its setup() runs only as __main__): the build's nvcc flags and arch list."""
    spec = importlib.util.spec_from_file_location("coconut_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(source: Path, output: Path, archs=("80", "90")) -> list[str]:
    """The build's nvcc flags (setup.py), warnings as errors, -Xptxas -v, SASS for each arch."""
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    return [shutil.which("nvcc") or "nvcc", *load_setup_module().NVCC_FLAGS, "-Werror", "all-warnings",
            "-Xptxas", "-v", f"-I{CSRC}", "-c", str(source), "-o", str(output), *gencode]


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(log: str) -> list[dict]:
    """Per kernel and arch: registers, shared memory, stack and spills from ptxas -v."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current = {"mangled": m.group(1), "arch": m.group(2)}
            kernels.append(current)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                                         r"loads", line)):
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(registers=int(m.group(1)), shared_bytes=int(smem.group(1)) if smem else 0)
    for kernel, name in zip(kernels, demangle([k["mangled"] for k in kernels])):
        kernel["kernel"] = name
    return kernels


@functools.lru_cache(maxsize=None)
def nvcc_compile(source: Path, archs=("80", "90")) -> dict:
    """{"returncode", "log", "kernels"}: one nvcc run per source and arch list in a process."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(nvcc_command(source, Path(tmp) / "kernel.o", archs), capture_output=True, text=True)
        built = (Path(tmp) / "kernel.o").exists() and (Path(tmp) / "kernel.o").stat().st_size > 0
    log = result.stdout + result.stderr
    return {"returncode": result.returncode, "built": built, "log": log, "kernels": parse_ptxas(log)}


def compile_cuda_sources(sources=None) -> dict[str, dict]:
    """nvcc_compile of every csrc/*.cu, in parallel threads (nvcc runs in its own processes)."""
    sources = sorted(CSRC.glob("*.cu")) if sources is None else sources
    with ThreadPoolExecutor(max(1, len(sources))) as pool:
        return dict(zip((s.name for s in sources), pool.map(nvcc_compile, sources)))


# ---------------------------------------------------------------- reports
def triton_table(records: list[dict]) -> str:
    """One line per kernel, arch and dtype: the largest shared memory and register counts over its cases."""
    rows = {}
    for r in records:
        key = (r["kernel"], r["arch"], r.get("dtype"))
        worst = rows.setdefault(key, {"shared": 0, "registers": 0, "stack": 0, "errors": 0, "cases": 0})
        worst["cases"] += 1
        worst["errors"] += "error" in r
        worst["shared"] = max(worst["shared"], r.get("shared_bytes", 0))
        worst["registers"] = max(worst["registers"], r.get("registers", 0))
        worst["stack"] = max(worst["stack"], r.get("stack_bytes", 0))
    lines = [f"{'triton kernel':<24}{'arch':<7}{'dtype':<6}{'cases':>6}{'max smem KiB':>14}{'max regs':>10}"
             f"{'stack B':>9}{'errors':>8}"]
    for (kernel, arch, dtype), w in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        lines.append(f"{kernel:<24}{arch:<7}{dtype or '-':<6}{w['cases']:>6}{w['shared'] / 1024:>14.1f}"
                     f"{w['registers']:>10}{w['stack']:>9}{w['errors']:>8}")
    return "\n".join(lines)


def cuda_table(results: dict[str, dict]) -> str:
    lines = [f"{'CUDA source':<28}{'arch':<7}{'kernels':>8}{'max regs':>10}{'max smem B':>12}{'spill B':>9}"]
    for source, result in sorted(results.items()):
        for arch in sorted({k["arch"] for k in result["kernels"]}):
            ks = [k for k in result["kernels"] if k["arch"] == arch]
            lines.append(f"{source:<28}{arch:<7}{len(ks):>8}{max(k.get('registers', 0) for k in ks):>10}"
                         f"{max(k.get('shared_bytes', 0) for k in ks):>12}"
                         f"{sum(k.get('spill_stores', 0) for k in ks):>9}")
        if result["returncode"] != 0:
            lines.append(f"{source:<28}nvcc failed (exit {result['returncode']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every combination of the engine's shapes")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--triton-json", action="store_true", help=argparse.SUPPRESS)  # the subprocess mode
    args = parser.parse_args(argv)
    if args.triton_json:
        json.dump(compile_triton_kernels(args.all), sys.stdout)
        return 0
    start = time.perf_counter()
    triton_run = compile_triton_in_subprocess(args.all)
    cuda = compile_cuda_sources() if shutil.which("nvcc") else {}
    stdout, stderr = triton_run.communicate()
    if triton_run.returncode != 0:
        print(stderr[-4000:], file=sys.stderr)
        return 1
    triton_records = json.loads(stdout)
    print(triton_table(triton_records))
    print(cuda_table(cuda) if cuda else "nvcc is not installed: the CUDA sources were not compiled")
    out = args.out or RESULTS_DIR / f"cpu-compiled-kernels-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "targets": {arch: {"cc": cc, "shared_limit_bytes": limit} for arch, (cc, limit) in TARGETS.items()},
        "all_combinations": args.all, "seconds": round(time.perf_counter() - start, 1),
        "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        if cuda else None,
        "triton": triton_records,
        "cuda": {name: {k: v for k, v in r.items() if k != "log"} for name, r in cuda.items()},
    }, indent=1))
    print(f"wrote {out}")
    failed = [r for r in triton_records if "error" in r or r["shared_bytes"] > r["shared_limit_bytes"]]
    spilled = [k for r in cuda.values() for k in r["kernels"] if k.get("spill_stores", 0) > 0]
    return 1 if failed or spilled or any(r["returncode"] != 0 for r in cuda.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
