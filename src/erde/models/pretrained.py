"""Pretrained weights for a model's backbone: a safetensors file or a PyTorch state dict.

Names are the plain network's (a torchvision or timm state dict as the library saves it) or
erde's own (an erde run's `model.safetensors`): `EarlyExitNet.source_keys` maps them to the
model's. The classifier may differ in size (other classes): it then keeps its fresh weights.
Any other shape that differs, or a file that shares no name with the model, is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from erde.errors import ErdeError
from erde.models.early_exit import EarlyExitNet

log = logging.getLogger("erde.models")
_WRAPPERS = ("state_dict", "model")  # keys common checkpoints keep their weights under


def read_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file; nothing but tensors and plain values is unpickled."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ErdeError(f"model.pretrained={path}: no such file; give a weights file or true")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every unreadable or unsafe file ends here
        raise ErdeError(
            f"model.pretrained={path} is neither a safetensors file nor a plain PyTorch state "
            f"dict ({type(exc).__name__}); save it with safetensors or torch.save(state_dict)"
        ) from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ErdeError(f"model.pretrained={path} holds no mapping of names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(net: EarlyExitNet, path: str | Path) -> None:
    """Copy the file's tensors into the backbone; log what was loaded, missing and unexpected."""
    state = read_state(path)
    mine = net.state_dict()
    targets = {src: mine[dst] for src, dst in net.source_keys.items()}
    last_head = f"heads.{len(net.heads) - 1}."
    shared = [k for k in state if k in targets]
    if not shared:
        raise ErdeError(
            f"model.pretrained={path} shares no tensor name with {net.arch['name']}: it is for "
            f"another architecture (file: {_sample(state)}; model: {_sample(targets)})"
        )
    wrong = [k for k in shared if state[k].shape != targets[k].shape]
    fresh = [k for k in wrong if net.source_keys[k].startswith(last_head)]
    if len(fresh) < len(wrong):
        rows = [
            f"{k} {tuple(state[k].shape)} vs {tuple(targets[k].shape)}"
            for k in wrong
            if k not in fresh
        ]
        raise ErdeError(
            f"model.pretrained={path} is for another architecture: {len(rows)} tensor(s) "
            f"differ in shape (file vs {net.arch['name']}): {'; '.join(rows[:5])}"
        )
    with torch.no_grad():
        for key in shared:
            if key not in fresh:
                targets[key].copy_(state[key])
    net.weights = f"file {Path(path).expanduser().resolve()}"
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    log.info(
        "pretrained %s: %d tensors loaded; missing %d%s; unexpected %d%s; classifier %s",
        path,
        len(shared) - len(fresh),
        len(missing),
        f" ({_sample(missing)})" if missing else "",
        len(unexpected),
        f" ({_sample(unexpected)})" if unexpected else "",
        "initialised afresh (other class count)" if fresh else "loaded",
    )


def _sample(names) -> str:
    names = list(names)
    more = f", ... {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more
