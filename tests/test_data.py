"""Loading the competition download, the split, the submission, and refusing bad input."""

import zipfile

import numpy as np
import pandas as pd
import pytest

from tests.helpers import real_rows, write_competition
from train import data


def test_loads_the_same_data_from_zip_and_from_folder(tmp_path):
    folder = write_competition(tmp_path / "f", 300, 40)
    zipped = write_competition(tmp_path / "z", 300, 40, as_zip=True)
    a, b = data.load_competition(folder), data.load_competition(zipped)
    assert a.train_images.shape == (300, 28, 28) and a.test_images.shape == (40, 28, 28)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int32
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    # Row 1 of the CSV is image 0, row-major: check one pixel against the text itself.
    first = real_rows(1, 1)[0].splitlines()[1].split(",")
    assert a.train_labels[0] == int(first[0])
    assert a.train_images[0].reshape(-1).tolist() == [int(v) for v in first[1:]]


@pytest.mark.skipif(not (data.Path(__file__).resolve().parents[2] / "shared/data/digit-recognizer.zip")
                    .exists(), reason="the competition download is not beside the project")
def test_the_real_competition_download_loads_whole():
    d = data.load_competition(data.Path(__file__).resolve().parents[2] / "shared/data/digit-recognizer.zip")
    assert d.train_images.shape == (42000, 28, 28) and d.test_images.shape == (28000, 28, 28)
    assert set(np.unique(d.train_labels)) == set(range(10))


def test_without_data_falls_back_to_the_shipped_demo_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = data.resolve(None)
    assert d.demo and "mnist_5k" in d.source
    assert d.train_images.shape == (4000, 28, 28) and d.test_images.shape == (1000, 28, 28)
    assert np.bincount(d.train_labels).tolist() == [400] * 10


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), [100, 200, 50, 80, 120, 90, 110, 70, 60, 120])
    tr, va = data.stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    counts = np.bincount(labels[va], minlength=10)
    np.testing.assert_array_equal(counts, np.round(np.bincount(labels) * 0.1).astype(int))
    tr2, va2 = data.stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(va, va2)
    _, va3 = data.stratified_split(labels, 0.1, seed=4)
    assert not np.array_equal(va, va3)
    tr0, va0 = data.stratified_split(labels, 0.0, seed=3)
    assert len(va0) == 0 and len(tr0) == len(labels)


def test_epoch_order_depends_only_on_seed_and_epoch():
    np.testing.assert_array_equal(data.epoch_order(100, 1, 5), data.epoch_order(100, 1, 5))
    assert not np.array_equal(data.epoch_order(100, 1, 5), data.epoch_order(100, 1, 6))
    assert sorted(data.epoch_order(100, 1, 5)) == list(range(100))


def test_repeated_augmentation_repeats_images_in_a_row_in_augmented_epochs_only():
    import dataclasses

    from train.common import Recipe, epoch_indices

    order = data.epoch_order(100, 1, 5, repeats=3)  # 34 images, three times each, cut to 100
    assert len(order) == 100 and len(set(order)) == 34
    np.testing.assert_array_equal(order[:99].reshape(33, 3), np.repeat(order[:99:3, None], 3, 1))
    np.testing.assert_array_equal(order[::3], data.epoch_order(100, 1, 5)[:34])  # the same shuffle
    recipe = dataclasses.replace(Recipe(), epochs=3, clean_epochs=1, batch_size=32, repeat_aug=2)
    augmented, clean = (epoch_indices(recipe, 100, e, steps_per_epoch=3) for e in (1, 2))
    assert len(augmented) == len(clean) == 96
    assert len(set(augmented)) == 48 and (augmented[::2] == augmented[1::2]).all()
    np.testing.assert_array_equal(clean, data.epoch_order(100, recipe.seed, 2)[:96])


def test_submission_has_kaggles_header_and_one_based_ids(tmp_path):
    path = tmp_path / "submission.csv"
    data.write_submission(path, np.array([3, 1, 4, 1, 5]))
    text = path.read_text().splitlines()
    assert text[0] == "ImageId,Label" and text[1] == "1,3" and text[-1] == "5,5"
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["ImageId", "Label"] and len(frame) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# ---- bad input: one clear line naming the place ------------------------------------------------
def _train_text(n=5):
    return real_rows(n, 1)[0]


def _mutate(text, row, col, value):
    lines = text.splitlines()
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("make,words", [
    (lambda t: "", "the file is empty"),
    (lambda t: "\x89PNG\x00\x00binary", "not CSV text"),
    (lambda t: t.replace("label,", "lbl,", 1), "wrong header (column 1 is 'lbl', expected 'label')"),
    (lambda t: t.replace(",", ";"), "wrong header (column 1 is 'label;pixel0;pixel1;pixel2;pixel3;pixel4...', "
                                    "expected 'label')"),
    (lambda t: _mutate(t, 3, 10, "x7"), "row 4, column 'pixel9' is 'x7'; expected an integer"),
    (lambda t: _mutate(t, 2, 5, ""), "row 3 has an empty (or NaN) cell (column 'pixel4')"),
    (lambda t: _mutate(t, 2, 9, "99999999999999999999"), "row 3, column 'pixel8' is 1e+20; expected a label"),
    (lambda t: _mutate(t, 3, 9, "inf"), "row 4, column 'pixel8' is inf; expected a label (0..9) or pixel"),
    (lambda t: _mutate(t, 1, 0, "1e30"), "row 2, column 'label' is 1e+30"),
    (lambda t: _mutate(t, 2, 300, "256"), "row 3, column 'pixel299' is 256; expected a pixel value in 0..255"),
    (lambda t: _mutate(t, 4, 7, "-1"), "row 5, column 'pixel6' is -1"),
    (lambda t: _mutate(t, 2, 0, "10"), "row 3 has label 10; expected a digit 0..9"),
    (lambda t: _mutate(t, 2, 0, "3.5"), "row 3, column 'label' is 3.5; expected an integer"),
    (lambda t: "\n".join(t.splitlines()[:3] + [t.splitlines()[3] + ",0"]) + "\n", "too many columns"),
    (lambda t: "\n".join(t.splitlines()[:3] + [t.splitlines()[3].rsplit(",", 2)[0]]) + "\n",
     "row 4 has too few columns"),
])
def test_bad_train_csv_is_refused_naming_row_and_column(make, words):
    with pytest.raises(data.DataError) as err:
        data.parse_train(make(_train_text()).encode(), "train.csv")
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_test_csv_with_a_label_column_is_refused():
    with pytest.raises(data.DataError, match="carries a 'label' column"):
        data.parse_test(_train_text().encode(), "test.csv")


def test_missing_paths_folders_and_corrupt_zips_are_refused(tmp_path):
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.load_competition(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no train.csv in this folder"):
        data.load_competition(tmp_path / "empty")
    good = write_competition(tmp_path / "z", 50, 5, as_zip=True)
    raw = good.read_bytes()
    (tmp_path / "cut.zip").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="corrupt zip"):
        data.load_competition(tmp_path / "cut.zip")
    # a member whose compressed bytes were damaged: the zip's directory reads, the member not
    with zipfile.ZipFile(good) as zf:
        start = zf.getinfo("train.csv").header_offset + 30 + len("train.csv")
    damaged = bytearray(raw)
    for i in range(start + 100, start + 140):
        damaged[i] ^= 0xFF
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    with pytest.raises(data.DataError, match="cannot read the zip"):
        data.load_competition(tmp_path / "damaged.zip", cache=False)
    with zipfile.ZipFile(tmp_path / "only-train.zip", "w") as zf:
        zf.writestr("train.csv", real_rows(5, 1)[0])
    with pytest.raises(data.DataError, match="holds no test.csv"):
        data.load_competition(tmp_path / "only-train.zip")


# ---- the parsed-data cache (train/cache.py) -------------------------------------------
def _same(a, b):
    for k in ("train_images", "train_labels", "test_images"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert getattr(a, k).dtype == getattr(b, k).dtype


def test_a_parsed_download_is_cached_by_content_and_read_back_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    zipped = write_competition(tmp_path / "z", 300, 40, as_zip=True)
    fresh = data.load_competition(zipped, cache=False)
    assert not (tmp_path / "cache").exists()
    first = data.load_competition(zipped)
    stored = list((tmp_path / "cache" / "data").glob("digits-*.npz"))
    assert len(stored) == 1 and data._fingerprint(zipped) in stored[0].name
    second = data.load_competition(zipped)  # read from the cache file
    _same(fresh, first)
    _same(fresh, second)
    # The same rows re-zipped byte for byte name the same file; changed rows another one.
    with zipfile.ZipFile(zipped) as zf:
        train = zf.read("train.csv").decode()
        test = zf.read("test.csv").decode()
    lines = train.splitlines()
    lines[1] = "7" + lines[1][1:] if not lines[1].startswith("7") else "3" + lines[1][1:]
    changed = tmp_path / "changed.zip"
    with zipfile.ZipFile(changed, "w") as zf:
        zf.writestr("train.csv", "\n".join(lines) + "\n")
        zf.writestr("test.csv", test)
    other = data.load_competition(changed)
    assert other.train_labels[0] == int(lines[1].split(",")[0]) != fresh.train_labels[0]
    assert len(list((tmp_path / "cache" / "data").glob("digits-*.npz"))) == 2


def test_a_damaged_cache_file_is_parsed_again_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_competition(tmp_path / "f", 200, 30)
    fresh = data.load_competition(folder)
    (stored,) = (tmp_path / "cache" / "data").glob("digits-*.npz")
    stored.write_bytes(stored.read_bytes()[:1000])  # cut short, as by a full disk
    _same(fresh, data.load_competition(folder))
    with np.load(stored) as f:  # written whole again
        np.testing.assert_array_equal(f["train_images"], fresh.train_images)


def test_a_bad_csv_is_refused_even_with_the_cache_on_and_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_competition(tmp_path / "f", 50, 10)
    text = (folder / "train.csv").read_text().splitlines()
    text[3] = text[3].replace(",0,", ",300,", 1)
    (folder / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(data.DataError, match="row 4.*expected a pixel value in 0..255"):
        data.load_competition(folder)
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_the_cache_folder_follows_the_environment(tmp_path):
    from train.cache import cache_dir

    assert cache_dir("data", {"VIT_CACHE_DIR": str(tmp_path)}) == tmp_path / "data"
    assert cache_dir("xla", {"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "vit-twins" / "xla"
    for off in ("off", "", "0", "none"):
        assert cache_dir("data", {"VIT_CACHE_DIR": off}) is None


def test_an_unusable_compilation_cache_folder_is_skipped_with_one_line(tmp_path, capsys):
    import jax

    from train.cache import use_jax_compilation_cache

    # as in a fresh process: no folder given to JAX yet (tests/conftest.py gives it the session's)
    session_folder = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        (tmp_path / "a-file").write_text("")
        assert use_jax_compilation_cache({"VIT_CACHE_DIR": str(tmp_path / "a-file")}) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", session_folder)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no compilation cache" in err


# ---- pseudo-labels (--pseudo-labels) -------------------------------------------------------
def test_pseudo_labels_round_trip_and_a_submission_reads_as_one(tmp_path):
    path = tmp_path / "pseudo.csv"
    data.write_pseudo_labels(path, np.array([4, 0, 7]), np.array([9, 1, 3]), np.array([0.99, 0.8, 0.51]))
    assert path.read_text().splitlines()[:2] == ["ImageId,Label,Confidence", "5,9,0.99"]
    rows, labels = data.read_pseudo_labels(path, num_test=8)
    assert rows.tolist() == [4, 0, 7] and labels.tolist() == [9, 1, 3] and labels.dtype == np.int32
    data.write_submission(tmp_path / "submission.csv", np.array([3, 1, 4]))
    rows, labels = data.read_pseudo_labels(tmp_path / "submission.csv", num_test=3)
    assert rows.tolist() == [0, 1, 2] and labels.tolist() == [3, 1, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo.csv", "submission.csv"]


@pytest.mark.parametrize("text,words", [
    ("ImageId,Label\n1,3\n9,2\n", "row 3, ImageId is 9; expected 1..8"),
    ("ImageId,Label\n0,3\n", "row 2, ImageId is 0; expected 1..8"),
    ("ImageId,Label\n1,3\n2,10\n", "row 3, Label is 10; expected 0..9"),
    ("ImageId,Label\n1,3\n2,x\n", "row 3, column 'Label' is 'x'; expected an integer"),
    ("ImageId,Label\n1,3\n2,\n", "row 3, column 'Label' is empty; expected an integer"),
    ("ImageId,Label\n1,3\n2,4\n1,5\n", "row 4 repeats ImageId 1"),
    ("Id,Label\n1,3\n", "no ImageId column"),
    ("ImageId,Label\n", "has a header but no rows"),
    ("", "not a readable CSV"),
])
def test_a_bad_pseudo_label_file_is_refused_naming_the_row(tmp_path, text, words):
    path = tmp_path / "pseudo.csv"
    path.write_text(text)
    with pytest.raises(data.DataError) as err:
        data.read_pseudo_labels(path, num_test=8)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(data.DataError, match="no such file"):
        data.read_pseudo_labels(tmp_path / "missing.csv", num_test=8)
