"""What timm and torchvision models share in erde: name suggestions and weight downloads."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import TypeVar

from erde.errors import ErdeError

T = TypeVar("T")


def closest_names(name: str, names: Iterable[str], count: int = 5) -> str:
    """The few names most like `name`, for a message; those that start alike first."""
    names = list(names)
    near = difflib.get_close_matches(name, names, n=count, cutoff=0.5)
    near += [n for n in names if n.startswith(name[:4]) and n not in near][: count - len(near)]
    return ", ".join(near) if near else "none close; see `erde models 'PREFIX/*'`"


def fetch_pretrained(label: str, fetch: Callable[[], T]) -> T:
    """Run a library's download of its weights; no network (or no such weights) is one line."""
    try:
        return fetch()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ErdeError(
            f"{label}: cannot download its pretrained weights here ({type(exc).__name__}: "
            f"{reason}); download them where the network allows and give "
            "model.pretrained=PATH (a safetensors file or a PyTorch state dict)"
        ) from None
