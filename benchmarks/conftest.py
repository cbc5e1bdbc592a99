"""Every recorded benchmark JSON names the software and the device it ran on."""


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["triton"] = triton_version
    machine_info["transformers"] = transformers.__version__
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
