"""Training checkpoints: written whole or not at all, found again after a restart, resumed exactly.

A checkpoint is a directory `checkpoint_{epoch}` (end of an epoch; `epoch` epochs done, the official
name) or `checkpoint_{epoch}_{step}` (`step` micro-batches into the next epoch), holding:

    model.safetensors   the HF model's weights (tied copies stored once), with config.json, the
                        tokenizer files and the Coconut config (and switch head), so
                        `CoconutModel.from_pretrained(dir)` loads the model save_pretrained would write
    optimizer.pt        AdamW state (a full, unsharded state dict also under FSDP2)
    rng_rank{r}.pt      python, numpy, torch and CUDA random states of rank r
    trainer_state.json  epoch, step in epoch, optimizer steps, best accuracy, data-order settings;
                        written last: a directory without it is incomplete

Everything is written into `.tmp-<name>` and renamed into place, so a crash leaves either the
previous checkpoints or the new one, never a half-written checkpoint under a checkpoint name.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import publish_directory
from .distributed import DistContext, all_reduce, barrier, is_fsdp

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?$")


def checkpoint_name(epoch: int, step_in_epoch: int = 0) -> str:
    return f"checkpoint_{epoch}" if step_in_epoch == 0 else f"checkpoint_{epoch}_{step_in_epoch}"


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[tuple[int, int], Path, str]]:
    """Complete checkpoints, oldest first, as ((epoch, step), path, kind).

    kind "full" is ours; kind "official" is a `checkpoint_{n}` file the official runner wrote
    (a torch state dict). Temporary `.tmp-*` directories and directories without trainer_state.json
    are skipped.
    """
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m is None:
            continue
        key = (int(m.group(1)), int(m.group(2) or 0))
        if path.is_dir() and (path / STATE_FILE).is_file():
            found.append((key, path, "full"))
        elif path.is_file() and m.group(2) is None:
            found.append((key, path, "official"))
    return sorted(found, key=lambda item: (item[0], item[2] == "full"))


def latest_checkpoint(save_dir: str | os.PathLike) -> tuple[Path, str] | None:
    found = list_checkpoints(save_dir)
    return (found[-1][1], found[-1][2]) if found else None


# ---------------------------------------------------------------------- random states
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- weights
def tied_duplicates(module: torch.nn.Module) -> set[str]:
    """Names under which an already listed parameter appears again (tied embeddings)."""
    every = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    unique = {name for name, _ in module.named_parameters()}
    return {name for name in every if name not in unique}


def full_model_state(coconut: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF model's full weights on the CPU (gathered from all ranks under FSDP2; call on every rank)."""
    if is_fsdp(coconut):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(coconut, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {k.removeprefix("model."): v for k, v in state.items()}
    else:
        state = {k: v.detach().cpu() for k, v in coconut.model.state_dict().items()}
    dropped = tied_duplicates(coconut.model)
    return {k: v.contiguous() for k, v in state.items() if k not in dropped}


def load_model_weights(hf_model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load HF-named weights; tied copies may be absent, anything else missing or extra is an error."""
    result = hf_model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tied_duplicates(hf_model))
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:8]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:8]}")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint directory, a .safetensors file, or a torch.save file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


# ---------------------------------------------------------------------- optimizer
def full_optimizer_state(coconut: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state dict (gathered under FSDP2; call on every rank)."""
    if is_fsdp(coconut):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(coconut, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(coconut: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    if is_fsdp(coconut):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(coconut, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ---------------------------------------------------------------------- save and load
def save_checkpoint(save_dir: str | os.PathLike, name: str, coconut: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict, ctx: DistContext) -> Path:
    """Write a checkpoint atomically (every rank calls this; rank 0 writes all but its own RNG file)."""
    save_dir = Path(save_dir)
    final, tmp = save_dir / name, save_dir / f".tmp-{name}"
    weights = full_model_state(coconut)
    optim_state = full_optimizer_state(coconut, optimizer) if optimizer is not None else None
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    error = None
    try:
        torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = e
    barrier(ctx)
    if ctx.is_main and error is None:
        try:
            hf = coconut.model
            save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            hf.config.save_pretrained(tmp)
            if getattr(hf, "generation_config", None) is not None:
                hf.generation_config.save_pretrained(tmp)
            coconut.write_coconut_files(tmp)  # so the checkpoint loads as save_pretrained's directory does
            if optim_state is not None:
                torch.save(optim_state, tmp / OPTIMIZER_FILE)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(trainer_state, f, indent=2)
            publish_directory(tmp, final)  # every file fsynced first
        except Exception as e:  # noqa: BLE001
            error = e
    failed = all_reduce([0.0 if error is None else 1.0], ctx)[0] > 0
    if failed:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise RuntimeError(f"saving checkpoint {name} failed on another rank")
    return final


def read_trainer_state(path: str | os.PathLike) -> dict:
    with open(Path(path) / STATE_FILE) as f:
        return json.load(f)


def load_rng_state(path: str | os.PathLike, rank: int) -> None:
    """Restore this rank's random states (rank 0's when the checkpoint had fewer ranks)."""
    path = Path(path)
    file = path / f"rng_rank{rank}.pt"
    if not file.is_file():
        file = path / "rng_rank0.pt"
    set_rng_state(torch.load(file, weights_only=True))
