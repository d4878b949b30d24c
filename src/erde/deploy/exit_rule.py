"""The exit rule a saved model ships with (`save_pretrained`): threshold, policy, score
normalisation, where they came from, and the weights they were chosen for.

A threshold only means something for the weights it was chosen on, so the file holds their
SHA-256 and a reader refuses it beside any other weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from erde.errors import ErdeError
from erde.evaluation.policy import POLICIES
from erde.files import sha256_file, write_text

FILE = "exit_rule.json"


class ExitRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    threshold: float = Field(ge=0, allow_inf_nan=False)
    policy: str
    normalize: bool
    source: str = Field(min_length=1)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("policy")
    @classmethod
    def _known(cls, policy: str) -> str:
        if policy not in POLICIES:
            raise ValueError(f"{policy!r} is not one of {', '.join(POLICIES)}")
        return policy

    def write(self, folder: Path) -> None:
        write_text(folder / FILE, self.model_dump_json(indent=2) + "\n")


def read_exit_rule(folder: Path, weights: Path) -> ExitRule | None:
    """The rule saved beside `weights`, None if there is none; ErdeError (one line with the fix)
    when it is damaged or belongs to other weights."""
    path = folder / FILE
    if not path.is_file():
        return None
    fix = "save the model again with save_pretrained, or delete the file to use the final exit"
    try:
        rule = ExitRule.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ErdeError(f"{path}: {_first_problem(exc)}; {fix}") from None
    if rule.weights_sha256 != sha256_file(weights):
        raise ErdeError(
            f"{path} was chosen for other weights than {weights} (SHA-256 differs); {fix}"
        )
    return rule


def _first_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "the file"
        return f"field {where}: {error['msg']}"
    if isinstance(exc, RecursionError):
        return "not JSON an erde file could hold (nested too deeply)"
    return f"not JSON ({' '.join(str(exc).split())[:120]})"
