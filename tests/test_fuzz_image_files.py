"""Image files in the formats Pillow opens lazily (IM, DDS, SPIDER, and TIFF in several
compressions, whose decoder libtiff writes complaints to stderr from C), written by Pillow and
damaged at random: the decoder, the image-folder reader and `erde infer` end with one line
naming the file (exit status 2), or with the pixels the file holds; never a traceback, and
nothing else on stderr: no libtiff line on file descriptor 2, no Pillow log record (which
Python prints to stderr when no handler is set, as on the command line). Issue 23 defects 14
and 23; run and export folders are fuzzed in tests/test_fuzz_run_files.py and
tests/test_fuzz_export_files.py."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fuzz_helpers import EXAMPLES, FAST, check, damage, run
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from erde.config.schema import load_config
from erde.data.decode import decode_image
from erde.data.image_folder import load_image_folder
from erde.data.prepare import prepare_data
from erde.deploy import export_run
from erde.errors import ErdeError
from erde.train.engine import fit

pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")

# (format, Pillow mode, save options): every mode each lazily decoded format writes.
KINDS = (
    ("IM", "L", {}), ("IM", "RGB", {}),
    ("DDS", "L", {}), ("DDS", "RGB", {}), ("DDS", "RGBA", {}),
    ("SPIDER", "F", {}),  # floating point: refused even whole, so damage must be refused too
    ("TIFF", "L", {}), ("TIFF", "L", {"compression": "tiff_lzw"}),
    ("TIFF", "L", {"compression": "packbits"}),
    ("TIFF", "RGB", {"compression": "tiff_adobe_deflate"}),
    ("TIFF", "RGB", {"compression": "jpeg"}),
)  # fmt: skip
SUFFIX = {"IM": ".im", "DDS": ".dds", "SPIDER": ".spi", "TIFF": ".tif"}


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A test digit of the digits data (H x W grey uint8), at the size the model reads."""
    return prepare_data(load_config("digits-student", FAST)).data.test_x[0, :, :, 0].numpy()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A one-epoch digits run, exported."""
    root = tmp_path_factory.mktemp("fuzz-images")
    fit(load_config("digits-student", FAST), root / "run", progress=False)
    export_run(root / "run", root / "export", threshold=0.5)
    return root / "export"


@pytest.fixture(scope="module")
def sources(digit) -> dict[int, bytes]:
    """The digit in every kind of KINDS, as Pillow writes it (colour kinds: a tinted digit)."""
    colour = np.stack([digit, 255 - digit, digit // 2], axis=2)
    files = {}
    for k, (fmt, mode, options) in enumerate(KINDS):
        img = Image.fromarray(digit if mode in ("L", "F") else colour).convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt, **options)
        files[k] = buf.getvalue()
    return files


def damaged(sources: dict[int, bytes], folder: Path, data, suffix: str | None = None) -> Path:
    """One of `sources` truncated or with bits flipped, written under `folder` with its format's
    file suffix, or `suffix` (Pillow goes by the content)."""
    k = data.draw(st.sampled_from(sorted(sources)))
    how = data.draw(st.sampled_from(["truncate", "flip"]))
    fmt, mode, options = KINDS[k]
    event(f"{fmt} {mode} {options.get('compression', '')} {how}")
    path = folder / f"image{suffix or SUFFIX[fmt]}"
    path.write_bytes(damage(sources[k], how, data.draw))
    return path


def quiet(capfd, caplog) -> None:
    """Nothing written to file descriptor 2 and no Pillow record an unconfigured logging would
    print there; both reset for the next example."""
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name.startswith("PIL")
            and r.levelno >= logging.WARNING] == []  # fmt: skip
    caplog.clear()


def pillow_pixels(path: Path, channels: int | None) -> np.ndarray | None:
    """The file's pixels by Pillow alone, where its mode is plain 8-bit grey or colour (the
    decoder's rules for other modes are tested in tests/test_data.py); None otherwise."""
    with Image.open(path) as img:
        if img.mode not in ("L", "RGB", "RGBA"):
            return None
        own = "L" if img.mode == "L" else "RGB"
        pixels = np.asarray(img.convert({None: own, 1: "L", 3: "RGB"}[channels]))
    return pixels[..., None] if pixels.ndim == 2 else pixels


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_damaged_images_decode_to_their_pixels_or_one_message(
    sources, tmp_path_factory, capfd, caplog, data
):
    path = damaged(sources, tmp_path_factory.mktemp("case"), data)
    channels = data.draw(st.sampled_from([None, 1, 3]))
    try:
        pixels = decode_image(path, channels)
    except ErdeError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        quiet(capfd, caplog)
        return
    quiet(capfd, caplog)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    assert pixels.shape[2] == (channels or pixels.shape[2]) and pixels.shape[2] in (1, 3)
    expected = pillow_pixels(path, channels)
    if expected is not None:
        np.testing.assert_array_equal(pixels, expected)


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_a_damaged_image_in_an_image_folder_is_one_message_or_read(
    digit, sources, tmp_path_factory, capfd, caplog, data
):
    """root/<class>/ with two clean PNG digits per class and one damaged file named .png (the
    reader takes image files by suffix, Pillow decodes them by content): read whole, or refused
    in one line naming the reader and the file."""
    root = tmp_path_factory.mktemp("case") / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(digit).save(root / name / f"{j}.png")
    path = damaged(sources, root / "a", data, ".png")
    try:
        images = load_image_folder(str(root), test_size=2)
    except ErdeError as exc:
        assert str(exc).startswith("imagefolder: ") and "\n" not in str(exc)
        assert str(path) in str(exc)  # the damaged file, not a clean one
        quiet(capfd, caplog)
        return
    quiet(capfd, caplog)
    assert len(images.train_x) + len(images.test_x) == 5  # the damaged file among them
    pixels = decode_image(path)
    assert pixels.shape[:2] == digit.shape  # else the sizes disagree and it is refused


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_erde_infer_of_a_damaged_image_is_one_line_or_its_pixels_answer(
    export, sources, tmp_path_factory, capfd, caplog, data
):
    folder = tmp_path_factory.mktemp("case")
    path = damaged(sources, folder, data)
    code, out, err = run(["infer", str(export), str(path), "--threads", "1", "--format", "json"])
    check(code, err)
    quiet(capfd, caplog)
    if code == 2:
        assert str(path) in err
        with pytest.raises(ErdeError):  # the decoder refuses it too: the file, not the export
            decode_image(path, 1)
        return
    # What the damaged file decodes to, saved as a clean PNG: the same answer.
    Image.fromarray(decode_image(path, 1)[..., 0]).save(folder / "decoded.png")
    code, again, err = run(["infer", str(export), str(folder / "decoded.png"), "--threads",
                            "1", "--format", "json"])  # fmt: skip
    assert code == 0, err
    (row,), (expected,) = json.loads(out), json.loads(again)
    assert {**row, "file": None, "warning": None} == {**expected, "file": None, "warning": None}
