"""The step profile: the launch-counting rule on a hand-counted toy, and the JSON `profile-step` writes."""
import json

import pytest
import torch

from coconut_fast.cli import main
from coconut_fast.kernels import add_rms_norm, triton_enabled
from coconut_fast.profiling import LaunchCounter, counting_triton_launches, profile_step

pytestmark = pytest.mark.usefixtures("one_thread")

STEP_KEYS = {"launches", "launches_per_layer", "host_us", "kernel_bytes", "floor_bytes", "by_kind"}


def test_the_rule_on_a_hand_counted_toy():
    x, w = torch.randn(4, 8), torch.randn(8, 6)
    with LaunchCounter() as counter:
        y = x @ w  # mm: 1 launch, reads x and w, writes y
        y.view(24).reshape(4, 6)[1:, :3].unsqueeze(0)  # views: 0
        y.t().contiguous()  # a copy: 1
        torch.zeros(3)  # a fill: 1
        torch.empty(5)  # an allocation: 0
        torch.tensor([1, 2, 3])  # an upload, not a launch
        y.sum().item()  # sum: 1, and one host sync
        torch.nn.functional.embedding(torch.tensor([0, 2]), torch.randn(10, 4))  # the randn: 1; embedding: 1
    count = counter.count
    assert count.launches == 6
    assert {k: t.launches for k, t in count.by_kind.items()} == {"mm": 1, "clone": 1, "zeros": 1, "sum": 1,
                                                                 "randn": 1, "embedding": 1}
    assert count.by_kind["mm"].bytes == (4 * 8 + 8 * 6 + 4 * 6) * 4
    assert count.by_kind["embedding"].bytes == 2 * (2 * 4 * 4) + 2 * 8  # the rows gathered, not the table
    assert count.uploads == 2 and count.host_syncs == 1


@pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_a_triton_kernel_is_one_launch_and_its_interpreter_work_is_not_counted():
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    counter = LaunchCounter()
    ops = type("Ops", (), {})()
    ops.add_rms_norm = add_rms_norm
    counter.wrap_kernels(ops)
    with counting_triton_launches(counter), counter:
        ops.add_rms_norm(x, r, w, 1e-6)
    assert {k: t.launches for k, t in counter.count.by_kind.items()} == {"add_rms_norm": 1}
    assert counter.count.by_kind["add_rms_norm"].bytes == 3 * 32 * 4 * 3 + 3 * 32 * 4 + 32 * 4


def test_profile_step_json_schema_and_counts(tmp_path):
    out = tmp_path / "profile.json"
    assert main(["profile-step", "--family", "llama", "--shape", "tiny", "--batch", "2", "--kernels", "torch",
                 "--context", "16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"family", "shape", "batch", "layers", "kernels", "latent", "decode"} <= set(result)
    assert (result["family"], result["shape"], result["batch"], result["layers"]) == ("llama", "tiny", 2, 2)
    for key in ("latent", "decode"):
        step = result[key]
        assert STEP_KEYS <= set(step)
        assert step["launches"] == sum(k["launches"] for k in step["by_kind"].values()) > 0
        assert step["kernel_bytes"] == sum(k["bytes"] for k in step["by_kind"].values())
        assert step["launches_per_layer"] == step["launches"] / 2
        assert step["host_us"] > 0 and step["timed_steps"] >= 20
        assert step["kernel_bytes"] > step["floor_bytes"] > 0
    # the latent step skips the LM head, the decode step reads it: its floor holds the head's weights
    head = 512 * 64 * 4
    assert result["decode"]["floor_bytes"] - result["latent"]["floor_bytes"] >= head - 2 * 64 * 4
    assert "lm_head" not in result["latent"]["by_kind"] and "mm" in result["decode"]["by_kind"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        profile_step("gpt2", "tiny", 0)
    with pytest.raises(ValueError, match="family must be one of"):
        profile_step("qwen9", "tiny", 1, kernels="torch")
    with pytest.raises(ValueError, match="context must be in"):
        profile_step("gpt2", "tiny", 1, kernels="torch", context=10_000)


@pytest.mark.skipif(not triton_enabled(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("family,batch", [("gpt2", 1), ("llama", 3)])
def test_count_only_counts_what_the_executed_kernels_count(family, batch):
    # the launches and byte models read launch arguments only: not running the Triton kernels changes nothing
    ran = profile_step(family, "tiny", batch, kernels="triton", context=8)
    counted = profile_step(family, "tiny", batch, kernels="triton", context=8, execute_kernels=False)
    assert ran["kernels_executed"] and not counted["kernels_executed"]
    for key in ("latent", "decode"):
        assert counted[key]["by_kind"] == ran[key]["by_kind"]
        assert counted[key]["floor_bytes"] == ran[key]["floor_bytes"]
        assert any(kind not in ("embedding", "addmm", "mm", "stack", "argmax") for kind in counted[key]["by_kind"])


def test_count_only_does_not_run_the_triton_launches():
    from triton.runtime.jit import KernelInterface

    calls = []
    kernel = type("K", (KernelInterface,), {"run": lambda self, *a, grid=None, warmup=False, **k: calls.append(a)})()
    counter = LaunchCounter()
    with counting_triton_launches(counter, execute=False):
        kernel[(1,)](1, 2)
    assert calls == [] and counter.count.launches == 1
    with counting_triton_launches(counter, execute=True):
        kernel[(1,)](1, 2)
    assert calls == [(1, 2)] and counter.count.launches == 2
