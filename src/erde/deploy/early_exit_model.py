"""A trained run as a model ready to predict, in the `from_pretrained`/`save_pretrained` form
users know from Hugging Face: images in (files, uint8 arrays or normalised tensors), class and
exit out, with the run's own normalisation and its val-calibrated threshold applied for them.

PyTorch eager on the whole batch (every exit computed, then the exit rule applied): the same
decisions as `erde.deploy.EarlyExitRuntime`, which is the form that really stops computing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erde.deploy.arrays import model_input
from erde.deploy.exit_rule import ExitRule, read_exit_rule
from erde.deploy.images import read_image
from erde.deploy.manifest import MANIFEST
from erde.errors import ErdeError
from erde.evaluation.policy import simulate
from erde.files import sha256_file
from erde.models.load import load_run_model
from erde.run import checkpoint as ckpt
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo
from erde.run.report import read_current_report


@dataclass(frozen=True)
class Predictions:
    """Per image: class index and name, the exit that answered (1-based, as every report
    numbers exits) and the answering exit's softmax."""

    labels: list[int]
    classes: list[str]
    exits: list[int]
    probabilities: torch.Tensor


class EarlyExitModel:
    """A trained early-exit network with what it needs to read images: its sidecar
    (`ModelInfo`: classes, normalisation, input size) and the exit rule (policy, threshold)."""

    def __init__(
        self,
        net: torch.nn.Module,
        info: ModelInfo,
        *,
        threshold: float = 0.0,
        policy: str = "entropy",
        normalize: bool = False,
        rule_source: str = "given when the model was made",
    ) -> None:
        self.net, self.info = net.eval(), info
        self.threshold, self.policy, self.normalize = threshold, policy, normalize
        self.rule_source = rule_source  # where the exit rule came from (a report, or a caller)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str = "cpu") -> EarlyExitModel:
        """A run folder or a `save_pretrained` folder, with its exit rule: the one saved beside
        the weights, else the threshold `erde evaluate` chose on val (RUN/eval/report.json, the
        one `erde export` deploys), else 0: the final exit."""
        if (Path(run_dir) / MANIFEST).is_file():
            raise ErdeError(
                f"{run_dir} is an `erde export` folder (ONNX pieces and its {MANIFEST}), not a "
                f"run: load it with erde.deploy.EarlyExitRuntime.from_export({str(run_dir)!r}), "
                "or give from_pretrained the run folder it was exported from"
            )
        net, info, digest = load_run_model(run_dir, device)
        run = RunDir(run_dir)
        saved = read_exit_rule(run.path, digest)
        if saved is not None:
            return cls(net, info, threshold=saved.threshold, policy=saved.policy,
                       normalize=saved.normalize, rule_source=saved.source)  # fmt: skip
        r = read_current_report(run.path, digest)
        if r is None:
            return cls(net, info)
        source = f"{run.eval.report_json}: {r.criterion}, chosen on val"
        return cls(net, info, threshold=r.chosen.threshold, policy=r.policy,
                   normalize=r.normalize, rule_source=source)  # fmt: skip

    def save_pretrained(self, out: str | Path) -> None:
        """Weights, sidecar and exit rule in the run-folder layout, so `from_pretrained(out)`
        answers exactly as this model does."""
        run = RunDir(out)
        run.path.mkdir(parents=True, exist_ok=True)
        ckpt.save_weights(run.weights, self.net, self.info, run.sidecar)
        ExitRule(
            threshold=self.threshold,
            policy=self.policy,
            normalize=self.normalize,
            source=self.rule_source,
            weights_sha256=sha256_file(run.weights),
        ).write(run.path)

    @property
    def classes(self) -> list[str]:
        return list(self.info.data.classes)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The batch as the network reads it, by `erde.deploy.arrays`' rule: uint8 pixels
        normalised as in training, float32/float16 taken as normalised, anything else refused."""
        return torch.from_numpy(model_input(images, self.info)).to(self._device())

    @torch.no_grad()
    def exit_logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Every exit's logits, N x exits x classes (none for an empty batch)."""
        x = self.prepare(images)
        if not len(x):
            return torch.zeros(0, self.info.num_exits, len(self.classes))
        return torch.stack(self.net(x), dim=1).float().cpu()

    def predict(
        self, images: np.ndarray | torch.Tensor, threshold: float | None = None
    ) -> Predictions:
        """Class and exit per image under the exit rule (`threshold` overrides the model's;
        0 means every image goes to the last exit). An empty batch gives empty lists."""
        logits = self.exit_logits(images)
        rule = self.threshold if threshold is None else threshold
        exits, labels = simulate(logits, rule, self.policy, self.normalize)
        probabilities = logits[torch.arange(len(logits)), exits].softmax(dim=-1)
        return Predictions(
            labels=labels.tolist(),
            classes=[self.classes[i] for i in labels.tolist()],
            exits=(exits + 1).tolist(),
            probabilities=probabilities,
        )

    def predict_files(
        self, paths: Sequence[str | Path], threshold: float | None = None
    ) -> Predictions:
        """Image files decoded, converted, resized and centre-cropped as evaluation and `erde
        infer` do (`erde.data.decode.resize_crop`), then `predict`; a file converted beyond
        recognition (colour to grey, a size far from the model's) gets the same warning, as a
        Python `UserWarning`. No files give empty lists."""
        d = self.info.data
        images = [np.zeros((0, d.input_size, d.input_size, d.in_channels), np.uint8)]
        for path in paths:
            pixels, warning = read_image(path, d.in_channels, d.input_size, d.eval_crop)
            if warning is not None:
                warnings.warn(warning, stacklevel=2)
            images.append(pixels[None])
        return self.predict(np.concatenate(images), threshold)
