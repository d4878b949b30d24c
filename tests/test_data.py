"""Data sources (official formats written here byte by byte), splits and on-device batches."""

import os
import pickle
import shutil
import struct
import subprocess
import sys
from unittest.mock import Mock

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from sklearn.datasets import load_digits

from erde.data import SOURCES, DeviceBatches, load_source, stratified_split
from erde.data.pixels import Normalize, Renormalize, decode_image, normalize_images
from erde.data.prepare import check_split, prepare_data
from erde.errors import ErdeError

# ---------------------------------------------------------------- official formats, hand-written


class Py2Str(bytes):
    """A Python 2 `str`: how the CIFAR pickles store their keys and label names."""


class Py2Pickler(pickle._Pickler):
    """Writes Py2Str with the Python 2 string opcodes, as the official CIFAR files have them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


class Py2NumpyPickler(Py2Pickler):
    """Also writes bytes (an array's raw pixels) as Python 2 strings, as Python 2 numpy did."""

    dispatch = Py2Pickler.dispatch.copy()
    dispatch[bytes] = Py2Pickler.save_py2str


def dump_py2(path, obj, pickler=Py2Pickler):
    with open(path, "wb") as f:
        pickler(f, protocol=2).dump(obj)


def k(name):
    return Py2Str(name.encode())


def random_images(n, seed, h=32, w=32, c=3):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def chw_rows(images):
    """The official CIFAR row: 1024 red, then 1024 green, then 1024 blue values, row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10(root, per_batch=4, pickler=Py2Pickler):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = random_images(5 * per_batch + 3, 1), []
    images[0, 5, 7] = (11, 201, 77)  # row 5, column 7 of the first image: R, G, B
    labels = [i % 10 for i in range(len(images))]
    for b in range(6):
        part = slice(b * per_batch, (b + 1) * per_batch) if b < 5 else slice(5 * per_batch, None)
        name = f"data_batch_{b + 1}" if b < 5 else "test_batch"
        batch = {
            k("batch_label"): k(name),
            k("labels"): labels[part],
            k("data"): chw_rows(images[part]),
            k("filenames"): [k(f"img{i}.png") for i in range(len(images[part]))],
        }
        dump_py2(folder / name, batch, pickler)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    meta = {k("label_names"): [k(n) for n in [*names, "truck"]], k("num_vis"): 3072}
    dump_py2(folder / "batches.meta", meta, pickler)
    return images, np.array(labels)


def test_cifar_pickles_have_the_official_bytes_keys(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)


def test_cifar10_loads_pixel_exact(tmp_path):
    images, labels = write_cifar10(tmp_path)
    data = load_source("cifar10", str(tmp_path), verify=False)
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (20, 32, 32, 3)
    assert data.train_x[0, 5, 7].tolist() == [11, 201, 77]
    assert torch.equal(data.train_x, torch.from_numpy(images[:20]))
    assert torch.equal(data.test_x, torch.from_numpy(images[20:]))
    assert data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == labels[:20].tolist()
    assert data.test_y.tolist() == labels[20:].tolist()
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.hflip
    assert (data.num_classes, data.in_channels, data.input_size) == (10, 3, (32, 32))
    # The data folder itself is accepted as root too.
    again = load_source("cifar10", str(tmp_path / "cifar-10-batches-py"), verify=False)
    assert torch.equal(again.train_x, data.train_x)


def test_cifar10_reads_arrays_pickled_by_python2_numpy(tmp_path):
    """The official files: raw pixels as a Python 2 string, numpy.core's reconstructor."""
    images, _ = write_cifar10(tmp_path, pickler=Py2NumpyPickler)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        raw = path.read_bytes()
        assert b"_codecs" not in raw
        path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    raw = (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    data = load_source("cifar10", str(tmp_path), verify=False)
    assert torch.equal(data.train_x, torch.from_numpy(images[:20]))
    assert torch.equal(data.test_x, torch.from_numpy(images[20:]))


def test_cifar10_verify_rejects_non_official_files(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ErdeError, match=r"md5 mismatch .*data_batch_1.*download=True"):
        load_source("cifar10", str(tmp_path), verify=True)


def test_cifar10_incomplete_folder_names_missing_file_and_download(tmp_path):
    write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(ErdeError, match=r"missing data_batch_3.*data\.download=true"):
        load_source("cifar10", str(tmp_path), verify=False)


def test_cifar10_unreadable_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ErdeError, match=r"could not read .*download=True"):
        load_source("cifar10", str(tmp_path), verify=False)


def test_missing_dataset_folder_says_what_to_get(tmp_path):
    with pytest.raises(ErdeError, match=r"cifar-10-batches-py.*download=True.*cifar-10-python"):
        load_source("cifar10", str(tmp_path))
    with pytest.raises(ErdeError, match=r"train_32x32\.mat.*download=True"):
        load_source("svhn", str(tmp_path))


def test_cifar100_loads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = random_images(7, 2)
    images[6, 31, 0] = (3, 4, 250)
    fine, coarse = [99, 0, 42, 7, 15, 63, 98], [19, 0, 1, 2, 3, 4, 5]
    for name, part in (("train", slice(0, 5)), ("test", slice(5, 7))):
        entry = {
            k("filenames"): [k("x.png")] * len(images[part]),
            k("batch_label"): k(name),
            k("fine_labels"): fine[part],
            k("coarse_labels"): coarse[part],
            k("data"): chw_rows(images[part]),
        }
        dump_py2(folder / name, entry)
    names = [k(f"class{i:02d}") for i in range(100)]
    dump_py2(folder / "meta", {k("fine_label_names"): names, k("coarse_label_names"): names[:20]})
    data = load_source("cifar100", str(tmp_path), verify=False)
    assert data.train_y.tolist() == fine[:5] and data.test_y.tolist() == fine[5:]
    assert data.test_x[1, 31, 0].tolist() == [3, 4, 250]
    assert torch.equal(data.train_x, torch.from_numpy(images[:5]))
    assert data.num_classes == 100 and data.classes[42] == "class42"
    with pytest.raises(ErdeError, match="md5 mismatch"):
        load_source("cifar100", str(tmp_path))


def test_svhn_mat_loads_pixel_exact_with_zero_as_label_10(tmp_path):
    digits = {"train": [10, 1, 2, 9, 10], "test": [3, 10]}
    expected = {}
    for split, ys in digits.items():
        images = random_images(len(ys), 3 if split == "train" else 4)
        images[0, 5, 7] = (11, 201, 77)
        scipy.io.savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": images.transpose(1, 2, 3, 0), "y": np.array(ys, np.uint8)[:, None]},
        )
        expected[split] = images
    data = load_source("svhn", str(tmp_path), verify=False)
    assert data.train_y.tolist() == [0, 1, 2, 9, 0] and data.test_y.tolist() == [3, 0]
    assert data.train_x[0, 5, 7].tolist() == [11, 201, 77]
    assert torch.equal(data.train_x, torch.from_numpy(expected["train"]))
    assert torch.equal(data.test_x, torch.from_numpy(expected["test"]))
    assert not data.hflip and data.classes == [str(d) for d in range(10)]
    with pytest.raises(ErdeError, match=r"md5 mismatch .*train_32x32\.mat"):
        load_source("svhn", str(tmp_path))


@pytest.mark.slow
def test_importing_erde_data_imports_neither_torchvision_nor_sklearn():
    # Both take seconds to import; they load when a source that needs them is read.
    code = "import sys, erde.data; print(sorted({'torchvision', 'sklearn'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------- digits, npz, real CIFAR-10


def test_digits_scaled_and_split_with_a_fixed_seed():
    torch.manual_seed(123)
    data = load_source("digits")
    torch.manual_seed(456)
    again = load_source("digits")
    assert data.train_x.shape == (1438, 8, 8, 1) and data.test_x.shape == (359, 8, 8, 1)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.test_y, again.test_y)
    assert (data.in_channels, data.input_size, data.num_classes) == (1, (8, 8), 10)
    assert not data.hflip
    assert int(data.train_x.min()) == 0 and int(data.train_x.max()) == 255
    # Every original image appears exactly once, scaled by 255/16.
    raw = load_digits()
    scaled = np.rint(raw.images * 255 / 16).astype(np.uint8).reshape(len(raw.images), -1)
    ours = torch.cat([data.train_x, data.test_x]).reshape(len(raw.images), -1).numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, scaled))
    # Stratified: each class's test share is within one image of 20 %.
    counts = np.bincount(raw.target)
    test_counts = np.bincount(data.test_y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 0.2) < 1)
    pixels = data.train_x.numpy().astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert data.std[0] == pytest.approx(pixels.std(), abs=1e-9)


def write_npz(folder, **overrides):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    arrays = {
        "train": {"x": random_images(30, 6, 9, 7), "y": rng.integers(0, 4, 30).astype(np.uint8)},
        "test": {"x": random_images(10, 7, 9, 7), "y": np.arange(10) % 4},
    }
    arrays["train"]["label_names"] = np.array(["a", "b", "c", "d"])
    for split, changes in overrides.items():
        arrays[split].update(changes)
        arrays[split] = {key: v for key, v in arrays[split].items() if v is not None}
    for split, content in arrays.items():
        np.savez(folder / f"{split}.npz", **content)
    return arrays


def test_npz_round_trip_and_stats(tmp_path):
    arrays = write_npz(tmp_path)
    data = load_source("npz", str(tmp_path))
    assert torch.equal(data.train_x, torch.from_numpy(arrays["train"]["x"]))
    assert torch.equal(data.test_x, torch.from_numpy(arrays["test"]["x"]))
    assert data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == arrays["train"]["y"].tolist()
    assert data.classes == ["a", "b", "c", "d"] and data.hflip and data.input_size == (9, 7)
    pixels = arrays["train"]["x"].astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(data.std, pixels.std(axis=(0, 1, 2)), atol=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"x": random_images(30, 6, 9, 7).astype(np.float32)}}, "dtype.*uint8"),
        ({"train": {"x": random_images(30, 6, 9, 7)[..., 0]}}, r"shape \(30, 9, 7\).*NHWC"),
        ({"test": {"x": random_images(10, 7, 8, 7)}}, "share one image size"),
        ({"test": {"y": None}}, "test.npz lacks the key.* y"),
        ({"train": {"y": np.full(30, -1)}}, "negative value -1"),
        ({"test": {"y": np.full(10, 4)}}, "label 4 is out of range for 4 classes"),
        ({"train": {"y": np.zeros(29, np.int64)}}, "30 images but 29 labels"),
        ({"train": {"y": np.zeros(30, np.float32)}}, "labels must be integers"),
        ({"train": {"y": np.array([object()] * 30)}}, "cannot read .*train.npz"),
    ],
)
def test_npz_bad_input(tmp_path, overrides, message):
    write_npz(tmp_path, **overrides)
    with pytest.raises(ErdeError, match=message):
        load_source("npz", str(tmp_path))


def test_npz_that_is_no_archive_is_named_without_pickle_advice(tmp_path):
    write_npz(tmp_path)
    (tmp_path / "test.npz").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(ErdeError) as info:
        load_source("npz", str(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / 'test.npz'} is not an .npz archive" in message
    assert "numpy.savez" in message and "non-object" in message
    assert "allow_pickle" not in message and "pickle.load" not in message


def test_npz_missing_file_and_missing_root(tmp_path):
    with pytest.raises(ErdeError, match=r"train\.npz does not exist.*test\.npz"):
        load_source("npz", str(tmp_path))
    with pytest.raises(ErdeError, match=r"data\.root"):
        load_source("npz")


def test_unknown_source_lists_the_known():
    with pytest.raises(ErdeError, match=r"unknown data source 'mnist'.*cifar10.*imagefolder"):
        load_source("mnist")
    assert set(SOURCES) == {"cifar10", "cifar100", "svhn", "digits", "npz", "imagefolder"}


def test_shared_cifar10_npz(shared_cifar10):
    data = load_source("npz", shared_cifar10)
    assert data.train_x.shape == (50000, 32, 32, 3) and data.test_x.shape == (10000, 32, 32, 3)
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert data.classes[0] == "airplane" and data.classes[9] == "truck"
    subset = data.train_x[::10].numpy().astype(np.float64) / 255
    np.testing.assert_allclose(subset.mean(axis=(0, 1, 2)), [0.4914, 0.4822, 0.4465], atol=5e-3)
    np.testing.assert_allclose(data.mean, [0.4914, 0.4822, 0.4465], atol=1e-4)
    np.testing.assert_allclose(data.std, [0.2470, 0.2435, 0.2616], atol=1e-4)


# ---------------------------------------------------------------- image folders


def write_folder(root, mode="RGB", size=(6, 5)):
    images = {}
    for split, per_class in (("train", 2), ("test", 1)):
        for c, cls in enumerate(["cat", "dog"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                pixels = np.random.default_rng(c * 10 + i).integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / cls / f"{i}.png")
                images[(split, cls, i)] = pixels
    return images


def test_imagefolder_rgb_pixel_exact(tmp_path):
    images = write_folder(tmp_path)
    data = load_source("imagefolder", str(tmp_path))
    assert data.classes == ["cat", "dog"] and data.train_x.shape == (4, 5, 6, 3)
    assert data.train_y.tolist() == [0, 0, 1, 1] and data.test_y.tolist() == [0, 1]
    assert np.array_equal(data.train_x[2].numpy(), images[("train", "dog", 0)])
    assert np.array_equal(data.test_x[0].numpy(), images[("test", "cat", 0)])
    assert data.hflip and data.input_size == (5, 6)


def test_imagefolder_grayscale_gives_one_channel(tmp_path):
    images = write_folder(tmp_path, mode="L")
    data = load_source("imagefolder", str(tmp_path))
    assert data.in_channels == 1
    assert np.array_equal(data.train_x[1, ..., 0].numpy(), images[("train", "cat", 1)])


def test_imagefolder_bad_input(tmp_path):
    write_folder(tmp_path)
    odd = tmp_path / "train" / "zebra"
    odd.mkdir()
    with pytest.raises(ErdeError, match=r"zebra .*hold no images"):
        load_source("imagefolder", str(tmp_path))
    (odd / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ErdeError, match=r"imagefolder: .*zebra/broken\.png: cannot decode"):
        load_source("imagefolder", str(tmp_path))
    Image.new("RGB", (7, 5)).save(odd / "broken.png")
    with pytest.raises(ErdeError, match=r"broken\.png is 7x5 .*0\.png is 6x5.*one size"):
        load_source("imagefolder", str(tmp_path))
    (odd / "broken.png").unlink()
    Image.new("RGB", (6, 5)).save(odd / "ok.png")
    assert load_source("imagefolder", str(tmp_path)).classes == ["cat", "dog", "zebra"]
    (tmp_path / "test" / "fish").mkdir()
    with pytest.raises(ErdeError, match=r"test has class folder.* fish that .*train lacks"):
        load_source("imagefolder", str(tmp_path))
    with pytest.raises(ErdeError, match=r"missing is not a folder; .*root/<class>/<image>"):
        load_source("imagefolder", str(tmp_path / "missing"))
    shutil.rmtree(tmp_path / "test")  # a train/ folder alone: still the split layout
    with pytest.raises(ErdeError, match=r"/test is not a folder; .*root/test/<class>/"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_mixes_grey_and_colour_into_rgb_and_scales_16_bit(tmp_path):
    # One 8-bit colour file and one 16-bit grey file: a colour set, grey repeated into R, G, B.
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (3, 2), (200, 100, 50)).save(tmp_path / split / "a" / "rgb.png")
    deep = np.array([[0, 257, 65535], [128, 129, 40000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "train" / "a" / "deep.png")
    data = load_source("imagefolder", str(tmp_path))
    assert data.train_x.shape == (2, 2, 3, 3)
    grey = np.rint(deep / 257.0).astype(np.uint8)  # [[0, 1, 255], [0, 1, 156]]
    assert np.array_equal(data.train_x[0].numpy(), np.repeat(grey[..., None], 3, axis=2))
    assert (data.train_x[1].numpy() == [200, 100, 50]).all()


# ------------------------------------------- root/<class>/ folders: seeded, stratified hold-outs

FLAT_COUNTS = {"ant": 20, "bee": 40, "cat": 60}  # 0.25 and 0.2 of each class are whole numbers


def write_flat_folder(root, counts=FLAT_COUNTS, size=(4, 4)):
    """root/<class>/<k>.png, each file's first pixel encoding (its number, its class), so a
    decoded image says which file it came from. Returns {(number, class index): class name}."""
    identity = {}
    number = 0
    for c, (cls, count) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True)
        for k in range(count):
            pixels = np.full((size[1], size[0], 3), 7, dtype=np.uint8)
            pixels[0, 0] = (number % 256, number // 256, c)
            Image.fromarray(pixels).save(root / cls / f"{k:04d}.png")
            identity[(number, c)] = cls
            number += 1
    return identity


def file_ids(x):
    """(file number, class index) of every decoded image (see write_flat_folder)."""
    first = x[:, 0, 0].to(torch.int64)
    return [(int(a) + 256 * int(b), int(c)) for a, b, c in first]


def flat_cfg(root, *overrides):
    """The schema's defaults (no preset) on the folder."""
    from erde.config.schema import load_config

    return load_config(None, ["data.source=imagefolder", f"data.root={root}", *overrides])


def test_flat_folder_holds_out_a_stratified_seeded_disjoint_test_split(tmp_path):
    identity = write_flat_folder(tmp_path)
    data = load_source("imagefolder", str(tmp_path), test_size=0.25)
    assert data.classes == ["ant", "bee", "cat"]
    # 0.25 of 20 / 40 / 60 images per class, the rest for training
    assert torch.bincount(data.test_y).tolist() == [5, 10, 15]
    assert torch.bincount(data.train_y).tolist() == [15, 30, 45]
    train, test = file_ids(data.train_x), file_ids(data.test_x)
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(identity)
    assert [c for _, c in train] == data.train_y.tolist()  # each label is its file's folder
    assert [c for _, c in test] == data.test_y.tolist()
    again = load_source("imagefolder", str(tmp_path), test_size=0.25)
    assert file_ids(again.test_x) == test  # seeded: the same files every time
    # a count holds out that many images; the default is a fifth of every class
    assert len(load_source("imagefolder", str(tmp_path), test_size=30).test_y) == 30
    default = load_source("imagefolder", str(tmp_path))
    assert torch.bincount(default.test_y).tolist() == [4, 8, 12]


def test_flat_folder_validation_follows_the_run_seed_test_does_not(tmp_path):
    write_flat_folder(tmp_path)
    splits = [
        prepare_data(
            flat_cfg(tmp_path, "data.val_size=0.2", "data.test_size=0.25", f"train.seed={s}")
        )
        for s in (0, 1)
    ]
    for split in splits:
        val_y = split.data.train_y[split.val_idx]
        assert torch.bincount(val_y).tolist() == [3, 6, 9]  # 0.2 of the 15 / 30 / 45 left
        train_ids = file_ids(split.data.train_x[split.train_idx])
        val_ids = file_ids(split.data.train_x[split.val_idx])
        test_ids = file_ids(split.data.test_x)
        assert len(set(train_ids + val_ids + test_ids)) == 120  # three disjoint parts of all
    assert torch.equal(splits[0].data.test_x, splits[1].data.test_x)
    assert not torch.equal(splits[0].val_idx, splits[1].val_idx)
    # streamed, the folder is split into the same files
    streamed = prepare_data(
        flat_cfg(tmp_path, "data.test_size=0.25", "data.stream=always", "data.workers=0")
    )
    paths, y = streamed.files("test")
    read = torch.from_numpy(np.stack([np.asarray(Image.open(p)) for p in paths]))
    assert file_ids(read) == file_ids(splits[0].data.test_x)
    assert y.tolist() == splits[0].data.test_y.tolist()


def test_a_1600_image_folder_trains_on_the_defaults(tmp_path):
    # 1,600 images in 4 classes: the defaults (test 0.2, val 0.1) fit, no key to set.
    write_flat_folder(tmp_path, {c: 400 for c in "abcd"}, size=(2, 2))
    split = prepare_data(flat_cfg(tmp_path))
    assert len(split.data.test_y) == 320
    assert (len(split.train_idx), len(split.val_idx)) == (1152, 128)


def test_train_size_trains_on_a_seeded_stratified_part_and_keeps_validation(tmp_path):
    write_flat_folder(tmp_path)  # 20 / 40 / 60; test 0.25 leaves 15 / 30 / 45
    sizes = ["data.test_size=0.25", "data.val_size=0.2"]  # then 12 / 24 / 36 to train on
    whole = prepare_data(flat_cfg(tmp_path, *sizes))
    for size in ("0.25", "18"):  # a quarter of each class: 3 / 6 / 9
        part = prepare_data(flat_cfg(tmp_path, *sizes, f"data.train_size={size}"))
        assert torch.bincount(part.data.train_y[part.train_idx]).tolist() == [3, 6, 9]
        assert set(part.train_idx.tolist()) < set(whole.train_idx.tolist())
        assert torch.equal(part.val_idx, whole.val_idx)  # validation and test stay whole
        assert torch.equal(part.data.test_y, whole.data.test_y)
    again = prepare_data(flat_cfg(tmp_path, *sizes, "data.train_size=18"))
    other = prepare_data(flat_cfg(tmp_path, *sizes, "data.train_size=18", "train.seed=1"))
    assert torch.equal(again.train_idx, part.train_idx)
    assert not torch.equal(other.train_idx, part.train_idx)
    everything = prepare_data(flat_cfg(tmp_path, *sizes, "data.train_size=72"))
    assert torch.equal(everything.train_idx, whole.train_idx)
    with pytest.raises(ErdeError, match=r"data.train_size=73 asks for more than the 72 images"):
        prepare_data(flat_cfg(tmp_path, *sizes, "data.train_size=73"))
    with pytest.raises(ErdeError, match=r"data.train_size=0.001 of 72 images holds none"):
        prepare_data(flat_cfg(tmp_path, *sizes, "data.train_size=0.001"))
    big_batch = flat_cfg(tmp_path, *sizes, "data.train_size=18", "train.batch_size=19")
    with pytest.raises(ErdeError, match=r"images left after data.val_size=0.2 and data.train_si"):
        check_split(big_batch, again)


def test_hold_out_sizes_refused_with_the_key_and_the_fraction_form(tmp_path):
    write_flat_folder(tmp_path, {"a": 6, "b": 1})
    with pytest.raises(
        ErdeError, match=r"data.test_size=7 asks for 7 of 7 images.*data.test_size=0.1"
    ):
        load_source("imagefolder", str(tmp_path), test_size=7)
    with pytest.raises(ErdeError, match=r"data.test_size=0.01 of the 7 images .* holds none out"):
        load_source("imagefolder", str(tmp_path), test_size=0.01)
    # 0.5 of b's single image rounds up: no b left to train on
    with pytest.raises(ErdeError, match=r"holds out every image of class\(es\) b"):
        load_source("imagefolder", str(tmp_path), test_size=0.5)
    with pytest.raises(ErdeError, match=r"data.val_size=5000 asks for 5000 of 5 images.*=0\.1\)"):
        prepare_data(flat_cfg(tmp_path, "data.val_size=5000", "data.test_size=2"))
    write_folder(tmp_path / "split")
    with pytest.raises(
        ErdeError, match=r"has its own train/ and test/ folders.*drop data.test_size"
    ):
        load_source("imagefolder", str(tmp_path / "split"), test_size=0.2)
    with pytest.raises(ErdeError, match=r"digits comes with its own test split"):
        flat_cfg(tmp_path, "data.source=digits", "data.test_size=0.2")


# ---------------------------------------------------------------- one decoder for every command


def luma(rgb):
    """ITU-R 601-2 luma, L = R 299/1000 + G 587/1000 + B 114/1000, rounded."""
    return np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.int64)


def test_decode_16_bit_grey_scales_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    deep[0, :4] = [0, 128, 129, 65535]  # the rounding edges: 128/257 < 0.5 < 129/257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    want = np.floor(deep.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    got = decode_image(tmp_path / "deep.png")
    assert got.shape == (5, 7, 1) and np.array_equal(got[..., 0], want)
    assert got[0, :4, 0].tolist() == [0, 0, 1, 255]
    assert np.array_equal(decode_image(tmp_path / "deep.png", 3), np.repeat(got, 3, axis=2))
    # Big-endian 16-bit TIFF and 32-bit "I" holding 16-bit values read the same way.
    big_endian = Image.frombytes("I;16B", (7, 5), deep.astype(">u2").tobytes())
    big_endian.save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16B"
    assert np.array_equal(decode_image(tmp_path / "deep.tif"), got)
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    assert np.array_equal(decode_image(tmp_path / "wide.tif"), got)
    Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)).save(tmp_path / "wider.tif")
    with pytest.raises(ErdeError, match=r"wider\.tif: .*70000\.\.70000, beyond the 16-bit"):
        decode_image(tmp_path / "wider.tif")
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ErdeError, match=r"float\.tif: floating-point images"):
        decode_image(tmp_path / "float.tif", 1)


def test_decode_palette_expands_to_the_palette_colours(tmp_path):
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.tobytes())
    img.info["transparency"] = 3  # transparency is dropped, not composited
    img.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert np.array_equal(decode_image(tmp_path / "palette.png"), palette[index])
    grey = decode_image(tmp_path / "palette.png", 1)[..., 0]
    assert np.abs(grey - luma(palette[index])).max() <= 1


def test_decode_drops_alpha(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(decode_image(tmp_path / "rgba.png"), rgba[..., :3])
    assert np.array_equal(decode_image(tmp_path / "rgba.png", 3), rgba[..., :3])
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    assert np.array_equal(decode_image(tmp_path / "la.png"), rgba[..., :1])
    assert np.array_equal(decode_image(tmp_path / "la.png", 3), np.repeat(rgba[..., :1], 3, 2))


def test_decode_cmyk_jpeg_to_rgb(tmp_path):
    rng = np.random.default_rng(3)
    cmyk = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    stored = np.asarray(Image.open(tmp_path / "cmyk.jpg"))  # the JPEG's CMYK after compression
    assert stored.shape == (8, 8, 4)
    c, k = stored[..., :3].astype(np.float64), stored[..., 3:].astype(np.float64)
    want = (255 - c) * (255 - k) / 255  # naive CMYK -> RGB: each ink and black subtract light
    got = decode_image(tmp_path / "cmyk.jpg")
    assert got.shape == (8, 8, 3) and np.abs(got - want).max() <= 1
    assert np.abs(decode_image(tmp_path / "cmyk.jpg", 1)[..., 0] - luma(got)).max() <= 1


def test_decode_grey_colour_and_size(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(decode_image(tmp_path / "rgb.png"), rgb)
    assert np.abs(decode_image(tmp_path / "rgb.png", 1)[..., 0] - luma(rgb)).max() <= 1
    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "bits.png")  # mode "1": 0 or 255
    assert np.array_equal(decode_image(tmp_path / "bits.png")[..., 0], (rgb[..., 0] > 127) * 255)
    # Other colour spaces go through Pillow's conversion to RGB, then to the model's channels.
    Image.new("LAB", (3, 3), (50, 128, 200)).save(tmp_path / "lab.tif")
    lab_rgb = np.asarray(Image.open(tmp_path / "lab.tif").convert("RGB"))
    assert np.array_equal(decode_image(tmp_path / "lab.tif"), lab_rgb)
    assert np.abs(decode_image(tmp_path / "lab.tif", 1)[..., 0] - luma(lab_rgb)).max() <= 1
    Image.new("L", (12, 20), 77).save(tmp_path / "flat.png")
    resized = decode_image(tmp_path / "flat.png", 3, size=8)
    assert resized.shape == (8, 8, 3) and (resized == 77).all()


def test_decode_mistakes_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    with pytest.raises(ErdeError, match=r"nothing\.png: no such file"):
        decode_image(tmp_path / "nothing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ErdeError, match=r"broken\.png: cannot decode the image"):
        decode_image(tmp_path / "broken.png")
    Image.new("L", (4, 4)).save(tmp_path / "grey.png")
    with pytest.raises(ErdeError, match="4-channel"):
        decode_image(tmp_path / "grey.png", 4)
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.tif")
    with monkeypatch.context() as m:  # a mode this Pillow build cannot convert
        m.setattr(Image.Image, "convert", Mock(side_effect=ValueError("not supported")))
        with pytest.raises(ErdeError, match=r"cmyk\.tif: its CMYK pixels cannot be converted"):
            decode_image(tmp_path / "cmyk.tif")
    Image.new("L", (20, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 pixels: over the limit (warning)
    with pytest.raises(ErdeError, match=r"big\.png: refused as a possible decompression bomb"):
        decode_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # over twice the limit (Pillow's error)
    with pytest.raises(ErdeError, match=r"big\.png: refused as a possible decompression bomb"):
        decode_image(tmp_path / "big.png")


def test_damaged_files_of_lazily_decoded_formats_are_one_quiet_line(tmp_path, recwarn):
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "good.dds", format="DDS")
    dds = bytearray((tmp_path / "good.dds").read_bytes())
    dds[82] = 0  # the pixel format's flags: Pillow raises NotImplementedError for these
    (tmp_path / "flags.dds").write_bytes(bytes(dds))
    with pytest.raises(ErdeError, match=r"flags\.dds: cannot decode the image \(NotImpl"):
        decode_image(tmp_path / "flags.dds", 1, 8)
    Image.fromarray(pixels).save(tmp_path / "good.tif")
    tif = bytearray((tmp_path / "good.tif").read_bytes())
    assert len(tif) == 378  # the 16 x 16 grey TIFF this Pillow writes: its tags at the end
    tif[113] = 0xFF  # a tag's count: "Tag data larger than file" warnings, then it decodes
    (tmp_path / "tags.tif").write_bytes(bytes(tif))
    try:
        decode_image(tmp_path / "tags.tif", 1, 8)
    except ErdeError as exc:
        assert "\n" not in str(exc)
    assert [str(w.message) for w in recwarn] == []


def test_normalize_images_matches_numpy_and_device_batches():
    x = random_images(6, 5, 4, 3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.05)
    out = normalize_images(x, mean, std)
    want = ((x / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-5)
    batches = DeviceBatches(torch.from_numpy(x), torch.arange(6), batch_size=6, mean=mean, std=std)
    assert torch.equal(next(iter(batches))[0], out)  # bit-identical: one function
    with pytest.raises(ValueError, match="uint8"):
        Normalize(mean, std)(out)


# ---------------------------------------------------------------- splits


def class_counts(y, idx):
    return torch.bincount(y[idx], minlength=int(y.max()) + 1).tolist()


def test_split_counts_are_exact_per_class():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]
    for val_size in (10, 0.1):
        train, val = stratified_split(y, val_size, seed=0)
        assert class_counts(y, val) == [5, 3, 2] and class_counts(y, train) == [45, 27, 18]
    # Quotas 3.5 / 3.5 / 3.0: the one left-over sample goes to the first of the tied classes.
    y = torch.tensor([0] * 7 + [1] * 7 + [2] * 6)
    assert class_counts(y, stratified_split(y, 10, seed=3)[1]) == [4, 3, 3]
    y = torch.tensor([3, 3, 7, 7, 7, 7])  # labels need not be 0..K-1
    assert torch.bincount(y[stratified_split(y, 3, seed=0)[1]]).tolist()[3::4] == [1, 2]


def test_split_deterministic_disjoint_covering():
    y = torch.arange(1000) % 7
    train, val = stratified_split(y, 0.25, seed=11)
    assert len(val) == 250
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))
    again_train, again_val = stratified_split(y, 0.25, seed=11)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, stratified_split(y, 0.25, seed=12)[1])
    train, val = stratified_split(y, 0, seed=0)
    assert len(val) == 0 and torch.equal(train, torch.arange(1000))


@pytest.mark.parametrize("val_size", [1000, 1.0, 2000, -1, 2.5, "10"])
def test_split_bad_sizes(val_size):
    with pytest.raises(ErdeError, match="val_size"):
        stratified_split(torch.arange(1000) % 7, val_size, seed=0)


# ---------------------------------------------------------------- device batches


def make_batches(x, **kwargs):
    y = torch.arange(len(x))  # the label is the image's index: batches say where they came from
    c = x.shape[3]
    return DeviceBatches(x, y, mean=[0.5] * c, std=[0.25] * c, **kwargs)


def test_each_index_once_per_epoch():
    x = torch.from_numpy(random_images(103, 0, 4, 4))
    batches = make_batches(x, batch_size=10, shuffle=True)
    seen = torch.cat([y for _, y in batches])
    assert len(batches) == 11 and batches.num_samples == 103
    assert torch.equal(seen.sort().values, torch.arange(103))
    assert not torch.equal(seen, torch.arange(103))  # shuffled
    dropped = make_batches(x, batch_size=10, shuffle=True, drop_last=True)
    assert len(dropped) == 10 and all(len(y) == 10 for _, y in dropped)


def test_normalisation_matches_numpy():
    x = random_images(20, 1, 5, 6)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.05)
    y = torch.arange(20)
    batches = DeviceBatches(torch.from_numpy(x), y, batch_size=8, mean=mean, std=std)
    out = torch.cat([xb for xb, _ in batches]).numpy()
    expected = ((x / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32 and out.shape == (20, 3, 5, 6)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)
    last = make_batches(torch.from_numpy(x), batch_size=8, channels_last=True)
    first = next(iter(last))[0]
    assert first.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(first.numpy(), ((x[:8] / 255 - 0.5) / 0.25).transpose(0, 3, 1, 2))


def unnormalise(xb):
    return (xb * 0.25 + 0.5).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def find_shift(original, out, pad=4):
    """Brute force over every (dy, dx, flip): which crop of the zero-padded image is `out`?"""
    h, w = original.shape[:2]
    padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
    hits = [
        (dy, dx, flip)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        for flip in (False, True)
        if np.array_equal(out, padded[dy : dy + h, dx : dx + w][:, :: -1 if flip else 1])
    ]
    assert len(hits) == 1, hits
    return hits[0]


def test_random_crop_is_a_shifted_copy_with_uniform_offsets():
    x = random_images(256, 2)
    batches = make_batches(torch.from_numpy(x), batch_size=256, augment=True, hflip=True)
    out, y = next(iter(batches))
    shifts = [
        find_shift(x[i], image) for i, image in zip(y.tolist(), unnormalise(out), strict=True)
    ]
    dys, dxs, flips = zip(*shifts, strict=True)
    assert set(dys) == set(range(9)) and set(dxs) == set(range(9))
    assert abs(np.mean(dys) - 4) < 0.5 and abs(np.mean(dxs) - 4) < 0.5
    assert np.mean(np.array(dys) == np.array(dxs)) < 0.25  # drawn independently: ~1/9 agree
    assert 0.4 < np.mean(flips) < 0.6


def test_flip_frequency_and_switches():
    x = random_images(4000, 3, 3, 4)
    flipped = x[:, :, ::-1]
    options = {"batch_size": 500, "augment": True, "crop_padding": 0, "hflip": True}
    out = unnormalise(torch.cat([b for b, _ in make_batches(torch.from_numpy(x), **options)]))
    is_flipped = np.all(out == flipped, axis=(1, 2, 3))
    assert np.all(is_flipped | np.all(out == x, axis=(1, 2, 3)))
    assert abs(is_flipped.mean() - 0.5) < 0.03
    for kwargs in ({"augment": True, "hflip": False}, {"augment": False, "hflip": True}):
        plain = make_batches(torch.from_numpy(x), batch_size=4000, crop_padding=0, **kwargs)
        assert np.array_equal(unnormalise(next(iter(plain))[0]), x)


def epoch_batches(batches, epoch):
    batches.set_epoch(epoch)
    return [(xb.clone(), yb.clone()) for xb, yb in batches]


def test_batches_are_a_function_of_seed_and_epoch():
    x = torch.from_numpy(random_images(50, 4, 8, 8))
    options = {"batch_size": 16, "shuffle": True, "augment": True, "hflip": True, "seed": 7}
    first, resumed = make_batches(x, **options), make_batches(x, **options)
    run = [epoch_batches(first, e) for e in range(3)]
    torch.manual_seed(999)  # the global RNG must play no part
    torch.rand(10)
    for a, b in zip(run[2], epoch_batches(resumed, 2), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(run[0][0][1], run[1][0][1])
    other_seed = epoch_batches(make_batches(x, **{**options, "seed": 8}), 2)
    assert not torch.equal(run[2][0][0], other_seed[0][0])


@pytest.mark.parametrize(
    ("n", "drop_last", "per_rank"), [(99, False, 33), (100, False, 34), (100, True, 33)]
)
def test_ranks_share_one_permutation(n, drop_last, per_rank):
    x = torch.from_numpy(random_images(n, 5, 2, 2))
    options = {"batch_size": 8, "shuffle": True, "seed": 3, "drop_last": drop_last}
    ranks = [make_batches(x, rank=r, world_size=3, **options) for r in range(3)]
    whole = torch.cat([y for _, y in make_batches(x, batch_size=n, shuffle=True, seed=3)])
    padded = torch.cat([whole, whole])[: 3 * per_rank]
    for r, batches in enumerate(ranks):
        assert batches.num_samples == per_rank
        assert len(batches) == (per_rank // 8 if drop_last else -(-per_rank // 8))
        assert len({len(b) for b in ranks}) == 1
        shard = torch.cat([y for _, y in batches])
        kept = len(batches) * 8 if drop_last else per_rank
        assert torch.equal(shard, padded[r::3][:kept])
    shards = [set(torch.cat([y for _, y in b]).tolist()) for b in ranks]
    if not drop_last:
        assert set.union(*shards) == set(range(n))
    if n % 3 == 0 or drop_last:
        assert sum(map(len, shards)) == len(set.union(*shards))  # disjoint


def test_batch_options_errors():
    x = torch.from_numpy(random_images(10, 0, 2, 2))
    with pytest.raises(ErdeError, match="batch_size"):
        make_batches(x, batch_size=0)
    with pytest.raises(ErdeError, match="crop_padding"):
        make_batches(x, batch_size=2, crop_padding=-1)
    with pytest.raises(ErdeError, match="Lower batch_size"):
        make_batches(x, batch_size=8, drop_last=True, world_size=2)


@pytest.mark.parametrize(
    "student, teacher",
    [
        (([0.2], [0.5]), ([0.1307], [0.3081])),
        (([0.0], [1e-3]), ([0.9], [2.0])),  # extreme scales both ways
        (([0.49, 0.48, 0.45], [0.25, 0.24, 0.26]), ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_renormalised_batches_are_the_teachers_own_bit_for_bit(student, teacher, channels_last):
    """Every pixel level 0..255 normalised with the student's statistics, renormalised: exactly
    (x / 255 - mean) / std with the teacher's, in the batch's memory layout."""
    c = len(student[0])
    pixels = torch.arange(256, dtype=torch.uint8).repeat(c * 4).view(4, c, 16, 16)
    x = Normalize(*student)(pixels)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = Renormalize(student, teacher)(x)
    mean64, std64 = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in teacher)
    by_hand = (pixels.double() - (mean64 * 255).float().double()).float()
    by_hand = by_hand * (1 / (std64 * 255)).float()
    assert torch.equal(out, by_hand)
    if channels_last:  # (a one-channel batch is both layouts at once)
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert Renormalize(teacher, teacher)(x) is x  # the same statistics: the batch unchanged
