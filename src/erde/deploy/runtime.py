"""Early exit for real: each image runs only as far as the first exit sure enough of it.

Two forms, same decisions. *Split* (any batch): run piece 1 on the batch, decide per image, and
give piece 2 only the undecided images, and so on. *Single* (one image): one ONNX Runtime call on
the export's `single.onnx`, whose `If` nodes decide inside the runtime (erde.deploy.single), so
nothing returns to Python between exits. The rule (`form="auto"`): a batch of one image takes the
single call when the export has one, larger batches are split; `form="split"` or `"single"`
(image by image) forces one. A threshold of 0 at every exit lets no image leave early (scores are
>= 0 and the rule is strict), so `auto` then runs the export's static network (`static.onnx`, no
intermediate heads): the same final-exit answers without paying for heads no image can use.

Each piece returns its exit score, computed with the simulator's own formula (the registered
policy's, `erde.evaluation.policy.exit_scores`, traced into the ONNX graph by `erde export`, so
the runtime reads only the policy's name and needs no plugin), and the
runtime applies the same float32 comparison `score < threshold`, so it takes the exits `simulate`
predicts (up to float rounding between ONNX Runtime and PyTorch); the last exit always answers.
Two backends share this loop: ONNX Runtime on an `erde export` folder (the deployment path) and
PyTorch eager on a run folder (no export needed; also the reference the ONNX pieces are checked
against; split form only). Pieces take and give numpy arrays, and this module imports numpy, ONNX
Runtime and Pillow only: the PyTorch backend lives in `erde.deploy.torch_backend`, imported by
`from_run` alone, so a machine without PyTorch runs exports (README, "Deploying without PyTorch").
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erde.data.decode import check_channels, normalize_array
from erde.deploy.arrays import model_input
from erde.deploy.images import read_image
from erde.deploy.manifest import EXIT, LOGITS, THRESHOLDS, Deployment, read_graph, read_manifest
from erde.device import cores
from erde.errors import ErdeError
from erde.evaluation.rule import check_policy_name, threshold_array
from erde.run.model_info import ModelInfo

# A piece maps its input to (features for the next piece, logits, exit score), float32 numpy
# arrays; the last piece gives (None, logits, None).
Piece = Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray, np.ndarray | None]]
# The single-call form: (one image 1 x C x H x W, float32 thresholds) -> (logits 1 x K, exit).
Single = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, int]]
Static = Callable[[np.ndarray], np.ndarray]
FORMS = ("auto", "single", "split")


@dataclass
class Prediction:
    """Per image: class index (`labels`, as in `EarlyExitModel.predict`; the runtime's `classes`
    are their names), softmax of the answering exit, the exit that answered (1-based,
    as every report and `erde infer` number exits), its logits.

    `images_per_piece[i]` is how many images piece i (exit i + 1) computed: the work really done.
    """

    labels: np.ndarray  # N, int64 class indices
    probabilities: np.ndarray  # N x K, float32
    exits: np.ndarray  # N, int64, 1 = the first exit
    logits: np.ndarray  # N x K, float32
    images_per_piece: list[int]

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class."""
        return self.probabilities.max(axis=1) if len(self.labels) else np.zeros(0, np.float32)


@dataclass
class FileResult:
    """One row of `classify_files`: a class and exit (1-based), or why the file failed; and a
    warning when the file had to be converted so much that the answer may mean nothing."""

    file: str
    class_index: int | None = None
    class_name: str | None = None
    exit: int | None = None
    confidence: float | None = None
    error: str | None = None
    warning: str | None = None


def ort_piece(session) -> Piece:
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def run(x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        result = session.run(outputs, {name: np.asarray(x)})
        return (None, result[0], None) if len(result) == 1 else tuple(result)

    return run


def _ort_single(session) -> Single:
    def run(x: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, int]:
        logits, exit_index = session.run([LOGITS, EXIT], {"image": x, THRESHOLDS: thresholds})
        return logits, int(exit_index[0])

    return run


def _ort_static(session) -> Static:
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output], {name: x})[0]

    return run


def ort_session(model: bytes | str, threads: int | None = None):
    """A CPU ONNX Runtime session; `threads` intra-op threads (None: ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 0 if threads is None else int(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: a failure raises with its message anyway, and
    # ONNX Runtime's own log lines on stderr would break erde's one-line errors
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def export_session(export_dir: Path, entry: dict, threads: int | None = None) -> _ExportSession:
    """A session of one graph of an export, checked against its manifest entry first. A graph
    can match an edited checksum and still be damaged: ONNX Runtime's refusal, when loading it
    or when running it, is then a message."""
    blob = read_graph(export_dir, entry)
    path = Path(export_dir) / entry["file"]
    try:  # ONNX Runtime prints its fallback attempt on stdout, where the results go
        with contextlib.redirect_stdout(io.StringIO()):
            return _ExportSession(ort_session(blob, threads), path)
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        raise ErdeError(
            f"{path} is a graph ONNX Runtime cannot load ({_reason(exc)}); re-create the folder "
            "with `erde export`"
        ) from None


def _reason(exc: Exception) -> str:
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(exc).split()))
    return f"{type(exc).__name__}: {text}"


class _ExportSession:
    """An export's ONNX Runtime session whose run-time failures (a damaged graph that loads,
    then fails in a kernel) are one line naming the file."""

    def __init__(self, session, path: Path) -> None:
        self.session, self.path = session, path
        self.get_inputs, self.get_outputs = session.get_inputs, session.get_outputs

    def run(self, outputs, feeds):
        try:
            return self.session.run(outputs, feeds)
        except Exception as exc:
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise ErdeError(
                f"{self.path} fails when ONNX Runtime runs it ({_reason(exc)}); re-create the "
                "folder with `erde export`"
            ) from None


class EarlyExitRuntime:
    """Classifies batches (uint8 pixels or normalised float32), running each image only up to
    the exit that answers it."""

    def __init__(
        self,
        pieces: Sequence[Piece],
        info: ModelInfo,
        point: Deployment,
        *,
        backend: str,
        single: Single | None = None,
        static: Static | None = None,
    ) -> None:
        check_policy_name(point.policy)
        if len(pieces) != info.num_exits:
            raise ValueError(f"{len(pieces)} pieces but {info.num_exits} exits")
        self.pieces = list(pieces)
        self.single = single
        self.static = static
        self.info = info
        self.policy = point.policy
        self.normalize = bool(point.normalize)
        self.backend = backend
        self.threshold = point.threshold

    @property
    def classes(self) -> list[str]:
        return self.info.data.classes

    @property
    def exit_macs(self) -> list[int]:
        return self.info.exit_macs

    @property
    def static_macs(self) -> int:
        return self.info.static_macs

    @property
    def input_size(self) -> int:
        return self.info.data.input_size

    @property
    def in_channels(self) -> int:
        return self.info.data.in_channels

    @property
    def num_exits(self) -> int:
        return len(self.pieces)

    @property
    def threshold(self) -> float | list[float]:
        """The threshold `predict` uses by default: one value, or one per deciding exit."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | Sequence[float]) -> None:
        # Validated and converted once: float32, the precision the simulator compares in.
        self._cutoffs = threshold_array(value, self.num_exits)
        self._none_leave = not (self._cutoffs > 0).any()  # once, not per batch-1 call
        self._threshold = float(value) if np.ndim(value) == 0 else [float(v) for v in value]

    def with_threshold(self, threshold: float | Sequence[float]) -> EarlyExitRuntime:
        """A runtime sharing these pieces with another default threshold."""
        other = copy.copy(self)
        other.threshold = threshold
        return other

    @classmethod
    def from_export(cls, export_dir: str | Path, *, threads: int | None = None) -> EarlyExitRuntime:
        """ONNX Runtime on CPU; every file is checked against the manifest before it is used.
        `threads`: intra-op threads, 0 to the cores (0 or None: all)."""
        if threads is not None and not 0 <= threads <= cores():
            raise ErdeError(
                f"threads={threads}: give 0 (all) to {cores()}, the cores of this machine "
                "(more threads than cores only slow ONNX Runtime down, 100000 hangs it)"
            )
        export_dir = Path(export_dir)
        m = read_manifest(export_dir)
        sessions = [export_session(export_dir, p, threads) for p in m.pieces]
        single = _ort_single(export_session(export_dir, m.single, threads))
        static = _ort_static(export_session(export_dir, m.static, threads))
        return cls(
            [ort_piece(s) for s in sessions],
            m.info,
            m.deployment,
            backend=f"onnxruntime {m.precision}",
            single=single,
            static=static,
        )

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        threshold: float | None = None,
        policy: str | None = None,
        normalize: bool | None = None,
    ) -> EarlyExitRuntime:
        """PyTorch eager on the run's checkpoint; threshold as `erde.deploy.export_run` picks it.
        The one constructor that needs PyTorch, imported here so that `from_export` does not."""
        try:
            from erde.deploy.torch_backend import run_pieces
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
                raise
            raise ErdeError(
                f"EarlyExitRuntime.from_run needs PyTorch ({exc}), absent from a runtime-only "
                "install; export the run with `erde export` and use from_export, or install "
                "erde with its dependencies"
            ) from None
        pieces, info, point = run_pieces(run_dir, threshold, policy, normalize)
        return cls(pieces, info, point, backend="torch")

    def _check_input(self, x) -> np.ndarray:
        """`erde.deploy.arrays`' rule, as `EarlyExitModel` reads arrays: uint8 pixels are
        normalised here, float32/float16 taken as normalised, anything else refused."""
        return model_input(x, self.info)

    def predict(
        self,
        x: np.ndarray,
        threshold: float | Sequence[float] | None = None,
        form: str = "auto",
    ) -> Prediction:
        """Class, probabilities and exit per image of a batch (a numpy array or a torch tensor):
        uint8 pixels or normalised float32 NCHW (`erde.deploy.arrays`); an empty batch gives
        empty arrays.

        `threshold` overrides the default (one value, or one per exit as `simulate` takes);
        `form` as the module docstring says.
        """
        x = self._check_input(x)
        if form not in FORMS:
            raise ErdeError(f"unknown runtime form {form!r}; choose one of {', '.join(FORMS)}")
        if form == "single" and self.single is None:
            raise ErdeError(
                f"the {self.backend} runtime has no single-call graph (an `erde export` folder "
                "has one); use form 'split' or 'auto'"
            )
        if threshold is None:
            cutoffs, none_leave = self._cutoffs, self._none_leave
        else:
            cutoffs = threshold_array(threshold, self.num_exits)
            none_leave = not (cutoffs > 0).any()
        if form == "auto" and self.static is not None and none_leave:
            return self._predict_static(x)
        if (
            self.single is not None
            and len(x)
            and (form == "single" or (form == "auto" and len(x) == 1))
        ):
            return self._predict_single(x, cutoffs)
        return self._predict_split(x, cutoffs)

    def _predict_static(self, x: np.ndarray) -> Prediction:
        """The plain network: every image answers at the last exit, as no threshold lets one out."""
        logits = self.static(x) if len(x) else np.zeros((0, len(self.classes)), np.float32)
        return Prediction(
            labels=logits.argmax(axis=1),
            probabilities=_softmax(logits),
            exits=np.full(len(x), self.num_exits, np.int64),
            logits=logits,
            images_per_piece=[len(x)] * self.num_exits,
        )

    def _predict_single(self, x: np.ndarray, cutoffs: np.ndarray) -> Prediction:
        """One session call per image; the graph's If nodes stop it at its exit. Lean on
        purpose: at batch 1 every microsecond of Python is a share of the saving."""
        if len(x) == 1:
            logits, exit_at = self.single(x, cutoffs)  # the graph numbers exits 1..n
            exits = np.array([exit_at], np.int64)
            work = [int(i < exit_at) for i in range(self.num_exits)]
        else:
            runs = [self.single(x[j : j + 1], cutoffs) for j in range(len(x))]
            logits = np.concatenate([r[0] for r in runs]).reshape(len(x), len(self.classes))
            exits = np.array([r[1] for r in runs], np.int64)
            work = np.bincount(exits - 1, minlength=self.num_exits)[::-1].cumsum()[::-1].tolist()
        return Prediction(
            labels=logits.argmax(axis=1),
            probabilities=_softmax(logits),
            exits=exits,
            logits=logits,
            images_per_piece=work,
        )

    def _predict_split(self, x: np.ndarray, cutoffs: np.ndarray) -> Prediction:
        """Piece by piece on the batch, each piece given only the images still undecided; the
        float32 comparison `score < threshold` of the simulator."""
        n, last = len(x), self.num_exits - 1
        work = [0] * self.num_exits
        if n == 0:
            k = len(self.classes)
            empty = np.zeros((0, k), np.float32)
            return Prediction(np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty, work)
        answered = []  # (image indices, or None for all n in order; exit, 1-based; logits)
        active = None
        for i, piece in enumerate(self.pieces):
            work[i] = len(x)
            features, out, scores = piece(x)
            if i == last:
                answered.append((active, i + 1, out))
                break
            done = np.asarray(scores) < cutoffs[i]
            n_done = int(done.sum())
            if n_done == len(out):
                answered.append((active, i + 1, out))
                break
            if n_done:
                ids = np.arange(n) if active is None else active
                stay = ~done
                answered.append((ids[done], i + 1, out[done]))
                active, features = ids[stay], features[stay]
            x = features
        if len(answered) == 1 and answered[0][0] is None:  # one exit answered the whole batch
            logits = np.asarray(answered[0][2], np.float32)
            exits = np.full(n, answered[0][1], np.int64)
        else:
            logits = np.empty((n, len(self.classes)), np.float32)
            exits = np.empty(n, np.int64)
            for ids, exit_, out in answered:
                logits[ids] = out
                exits[ids] = exit_
        return Prediction(
            labels=logits.argmax(axis=1),
            probabilities=_softmax(logits),
            exits=exits,
            logits=logits,
            images_per_piece=work,
        )

    def classify_files(
        self,
        paths: Sequence[str | Path],
        threshold: float | None = None,
        batch_size: int = 64,
        form: str = "auto",
    ) -> list[FileResult]:
        """One row per file, in order; a file that cannot be read gets a row saying why, one
        converted so much that the answer may mean nothing a warning (`images.read_image`)."""
        check_channels(self.in_channels)
        if batch_size < 1:
            raise ErdeError(f"batch size must be at least 1, got {batch_size}")
        rows = [FileResult(str(p)) for p in paths]
        good: list[tuple[int, np.ndarray]] = []
        for i, path in enumerate(paths):
            try:
                pixels, rows[i].warning = read_image(
                    path, self.in_channels, self.input_size, self.info.data.eval_crop
                )
            except ErdeError as exc:
                rows[i].error = str(exc)
            else:
                good.append((i, pixels))
        for start in range(0, len(good), batch_size):
            part = good[start : start + batch_size]
            x = normalize_array(
                np.stack([img for _, img in part]), self.info.data.mean, self.info.data.std
            )
            pred = self.predict(x, threshold, form)
            for j, (i, _) in enumerate(part):
                rows[i].class_index = int(pred.labels[j])
                rows[i].class_name = self.classes[rows[i].class_index]
                rows[i].exit = int(pred.exits[j])
                rows[i].confidence = float(pred.confidence[j])
        return rows


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum so no exp overflows."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
