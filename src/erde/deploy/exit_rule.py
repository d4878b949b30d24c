"""The exit rule a saved model ships with (`save_pretrained`): threshold, policy, score
normalisation, where they came from, and the weights they were chosen for.

A threshold only means something for the weights it was chosen on, so the file holds their
SHA-256 and a reader refuses it beside any other weights. Its fields obey the rules of the other
erde files (`erde.run.formats`: the same threshold, policy and SHA-256 as an export's manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from annotated_types import MinLen
from pydantic import BaseModel, ConfigDict, TypeAdapter

from erde.errors import ErdeError
from erde.evaluation.rule import PolicyName
from erde.files import parse_json, write_text
from erde.run.formats import VERSION_KEY, Flag, NonNegative, Sha256, Text, check_version, validate
from erde.run.layout import RunDir

FILE = "exit_rule.json"
FORMAT_VERSION = 1
FIX = "save the model again with save_pretrained, or delete the file to use the final exit"


class ExitRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: NonNegative
    policy: PolicyName
    normalize: Flag
    source: Annotated[Text, MinLen(1)]
    weights_sha256: Sha256

    def write(self, folder: Path) -> None:
        rule = {VERSION_KEY: FORMAT_VERSION, **self.model_dump()}
        write_text(folder / FILE, json.dumps(rule, indent=2) + "\n")


_ADAPTER = TypeAdapter(ExitRule)


def read_exit_rule(folder: Path, weights_sha256: str) -> ExitRule | None:
    """The rule saved in `folder`, None if there is none; ErdeError (one line with the fix)
    when it is damaged or belongs to other weights than those of digest `weights_sha256`."""
    path = folder / FILE
    if not path.is_file():
        return None
    try:
        raw = parse_json(path.read_bytes())
    except ValueError as exc:
        raise ErdeError(f"{path}: not JSON ({exc}); {FIX}") from None
    rule = validate(_ADAPTER, check_version(raw, path, FORMAT_VERSION, {}, FIX), path, FIX)
    if rule.weights_sha256 != weights_sha256:
        raise ErdeError(
            f"{path} was chosen for other weights than {RunDir(folder).weights} (SHA-256 "
            f"differs); {FIX}"
        )
    return rule
