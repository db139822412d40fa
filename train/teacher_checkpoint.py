"""Teacher checkpoints: trainable weights, best weights and AdamW state in safetensors, counters in JSON.

Written at the end of every epoch (temp directory + rename), so an interrupted run loses at most
one epoch; `resume` continues with the same data order and dropout seeds (both derived from the
seed and the epoch), so a resumed run ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leader_edge.files import atomic_directory
from leader_edge.errors import StateError


def save_checkpoint(directory: Path, model, opt: torch.optim.Optimizer, state: dict, best: dict[str, torch.Tensor]) -> None:
    """Write model/best/optimizer tensors + `state` counters to `directory` atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.trainable_state().items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{idx}.{name}"] = t.detach().cpu().contiguous()
    with atomic_directory(directory, marker="state.json", what="teacher checkpoint") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(directory: Path, model, opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer from `directory`; return (state counters, best weights)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "state.safetensors"))
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_trainable_state(part("model."))
    opt_state: dict[int, dict] = {}
    for k, v in part("opt.").items():
        idx, name = k.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    saved = opt.state_dict()
    if opt_state and len(opt_state) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise StateError(f"checkpoint {directory} was written with a different set of trained parameters; "
                         "start without --resume or use the same teacher options")
    saved["state"] = opt_state
    opt.load_state_dict(saved)
    return state, part("best.")
