"""MovieLens-100K (Harper & Konstan, "The MovieLens Datasets", ACM TiiS 2015) from its files.

``u.data``, ``u.item`` and ``u.user`` become one `InteractionLog`: ratings with 0-based ids, the
19 genre flags as item features, a one-hot age/gender/occupation profile as user features.
Every defect raises `DatasetError` naming the file, the line and the fix.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from coevo.tasks.log import DatasetError, InteractionLog

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
EXPECTED_COUNTS = MappingProxyType({"ratings": 100_000, "users": 943, "items": 1_682})

_FOLDER = "ml-100k"
_FILES = ("u.data", "u.item", "u.user")
_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_AGE_EDGES = (18, 25, 35, 45, 50, 56)
_AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_GENDERS = ("F", "M")
_FIELDS = {
    "u.data": ("user", "item", "rating", "timestamp"),
    "u.item": ("id", "title", "release date", "video release date", "IMDb URL", *_GENRES),
    "u.user": ("id", "age", "gender", "occupation", "zip"),
}
_TRUNCATED = "the file looks truncated; re-download it"
_HOW_TO_FIX = (
    "Pass --data-dir DIR or set COEVO_DATA=DIR where DIR/ml-100k/u.data exists, "
    "or run `coevo data download movielens-100k` to download it from GroupLens."
)


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data folder to use: ``data_dir`` if given, else ``$COEVO_DATA``, else ``None``."""
    if data_dir is not None and str(data_dir):
        return Path(data_dir).expanduser()
    from_env = os.environ.get("COEVO_DATA", "")
    return Path(from_env).expanduser() if from_env else None


def default_cache_dir() -> Path:
    """Where downloads go: ``$COEVO_CACHE`` if set, else ``~/.cache/coevo``."""
    from_env = os.environ.get("COEVO_CACHE", "")
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "coevo"


def find_movielens_100k(data_dir: str | Path | None = None) -> Path:
    """The folder holding ``u.data``, ``u.item``, ``u.user``; else `DatasetError` with the fix.

    Args:
        data_dir: a data folder with one sub-folder per dataset (``DIR/ml-100k/``), or the
            MovieLens folder itself. ``None`` means ``$COEVO_DATA``, and when that is unset too,
            `default_cache_dir` (where ``coevo data download`` puts it).
    """
    resolved = resolve_data_dir(data_dir)
    root = resolved if resolved is not None else default_cache_dir()
    looked = []
    for folder in (root / _FOLDER, root):
        missing = [name for name in _FILES if not (folder / name).is_file()]
        if not missing:
            return folder
        looked.append(f"{folder} (missing {', '.join(missing)})")
    origin = "" if resolved is not None else ", the download cache, as neither was given"
    raise DatasetError(
        f"MovieLens-100K not found: looked in {' and '.join(looked)}{origin}. {_HOW_TO_FIX}"
    )


def load_movielens_100k(
    data_dir: str | Path | None = None, *, expected: Mapping[str, int] = EXPECTED_COUNTS
) -> InteractionLog:
    """Parse MovieLens-100K into an `InteractionLog` with 0-based ids.

    Args:
        data_dir: see `find_movielens_100k`.
        expected: counts to verify, keys among ``ratings``, ``users``, ``items``; a key left
            out is not checked.

    Returns:
        The log, with ``item_features`` the 19 genre flags and ``user_features`` the one-hot
        age bucket (7), gender (F, M) and occupation (sorted, as present); ``info`` holds the
        source folder and the feature column names. Missing, truncated or malformed files,
        or ids in ``u.data`` that ``u.user``/``u.item`` lack, raise `DatasetError`.
    """
    return _load_folder(find_movielens_100k(data_dir), expected)


def download_movielens_100k(
    cache_dir: str | Path,
    *,
    url: str = GROUPLENS_URL,
    expected: Mapping[str, int] = EXPECTED_COUNTS,
    timeout_s: float = 60,
) -> Path:
    """Download, verify and unpack MovieLens-100K into ``cache_dir/ml-100k/``.

    Nothing is fetched when ``cache_dir/ml-100k`` already loads with ``expected``. The zip is
    CRC-checked and its three files are verified before they replace ``cache_dir/ml-100k`` in
    one rename, so a failure (`DatasetError` naming the URL) leaves no half-written copy.

    Args:
        cache_dir: the data folder to fill; created if needed.
        url: any URL `urllib.request` opens (``https://``, ``http://``, ``file://``).
        expected: counts the unpacked copy must have, as in `load_movielens_100k`.
        timeout_s: socket timeout for the download.

    Returns:
        ``cache_dir``, ready to pass as ``data_dir`` to `load_movielens_100k`.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / _FOLDER
    try:
        _load_folder(target, expected)
        return cache_dir
    except DatasetError:
        pass  # absent or damaged: fetch a fresh copy
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=cache_dir))
    try:
        archive, unpacked = staging / "ml-100k.zip", staging / _FOLDER
        _fetch(url, archive, timeout_s)
        _extract(url, archive, unpacked)
        try:
            _load_folder(unpacked, expected)
        except DatasetError as error:
            raise DatasetError(f"{url}: the downloaded copy is unusable: {error}") from error
        if target.exists():  # a rename cannot replace a non-empty folder, so move it aside
            os.replace(target, staging / "stale")
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def _fetch(url: str, archive: Path, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as source, archive.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    except urllib.error.HTTPError as error:
        error.close()  # it holds the open response; left alone it leaks the socket
        raise DatasetError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DatasetError(f"download of {url} failed: {reason}") from error


def _extract(url: str, archive: Path, folder: Path) -> None:
    members = {name: f"{_FOLDER}/{name}" for name in _FILES}
    folder.mkdir()
    try:
        with zipfile.ZipFile(archive) as bundle:
            broken = bundle.testzip()
            if broken is not None:
                raise DatasetError(f"{url}: the download is corrupt: {broken} fails its CRC check")
            missing = [member for member in members.values() if member not in bundle.namelist()]
            if missing:
                raise DatasetError(f"{url}: the zip has no {', '.join(missing)}")
            for name, member in members.items():
                with bundle.open(member) as source, open(folder / name, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise DatasetError(f"{url}: the download is corrupt or not a zip ({error})") from error


def _load_folder(folder: Path, expected: Mapping[str, int]) -> InteractionLog:
    unknown = set(expected) - set(EXPECTED_COUNTS)
    if unknown:
        raise ValueError(f"expected: unknown keys {sorted(unknown)}, use {sorted(EXPECTED_COUNTS)}")
    user_features, user_names = _parse_users(folder / "u.user", expected)
    item_features = _parse_items(folder / "u.item", expected)
    num_users, num_items = len(user_features), len(item_features)
    table = _read_table(folder / "u.data", "\t", expected.get("ratings"), "ratings")
    user, item, rating, timestamp = _integers("u.data", table, range(4)).T
    for column, values, count in (("user", user, num_users), ("item", item, num_items)):
        bad = np.flatnonzero((values < 1) | (values > count))
        if bad.size:
            what = f"line {bad[0] + 1} has {column} {values[bad[0]]}"
            raise DatasetError(f"u.data: {what}, not in u.{column} (which has 1..{count})")
    bad = np.flatnonzero((rating < 1) | (rating > 5))
    if bad.size:
        raise DatasetError(f"u.data: line {bad[0] + 1} has rating {rating[bad[0]]}, expected 1..5")
    return InteractionLog(
        name="movielens-100k",
        user=user - 1,
        item=item - 1,
        rating=rating.astype(np.float32),
        timestamp=timestamp.copy(),
        num_users=num_users,
        num_items=num_items,
        item_features=item_features,
        user_features=user_features,
        info={
            "source": str(folder),
            "user_feature_names": user_names,
            "item_feature_names": list(_GENRES),
        },
    )


def _parse_users(path: Path, expected: Mapping[str, int]) -> tuple[np.ndarray, list[str]]:
    table = _read_table(path, "|", expected.get("users"), "users")
    ids, ages = _integers(path.name, table, (0, 1)).T
    genders = table[:, 2]
    bad = np.flatnonzero(~np.isin(genders, _GENDERS))
    if bad.size:
        what = f"line {bad[0] + 1} has gender {str(genders[bad[0]])!r}"
        raise DatasetError(f"{path.name}: {what}, expected F or M")
    occupations, occupation_index = np.unique(table[:, 3], return_inverse=True)
    num_buckets, num_genders = len(_AGE_BUCKETS), len(_GENDERS)
    rows = np.arange(len(table))
    in_file_order = np.zeros((len(table), num_buckets + num_genders + len(occupations)), np.float32)
    in_file_order[rows, np.searchsorted(_AGE_EDGES, ages, side="right")] = 1
    in_file_order[rows, num_buckets + (genders == "M")] = 1
    in_file_order[rows, num_buckets + num_genders + occupation_index] = 1
    names = [f"age_{bucket}" for bucket in _AGE_BUCKETS] + [f"gender_{g}" for g in _GENDERS]
    names += [f"occupation_{occupation}" for occupation in occupations]
    return _by_id(path.name, ids, in_file_order, "user"), names


def _parse_items(path: Path, expected: Mapping[str, int]) -> np.ndarray:
    table = _read_table(path, "|", expected.get("items"), "items")
    numbers = _integers(path.name, table, (0, *range(5, 5 + len(_GENRES))))
    ids, flags = numbers[:, 0], numbers[:, 1:]
    bad = np.argwhere((flags != 0) & (flags != 1))
    if bad.size:
        what = f"line {bad[0, 0] + 1} has {_GENRES[bad[0, 1]]} flag {flags[tuple(bad[0])]}"
        raise DatasetError(f"{path.name}: {what}, expected 0 or 1")
    return _by_id(path.name, ids, flags.astype(np.float32), "item")


def _read_table(path: Path, separator: str, expected: int | None, noun: str) -> np.ndarray:
    """The file as a str array ``[num_lines, num_fields]``, line shape and count checked."""
    fields = _FIELDS[path.name]
    try:
        # latin-1 decodes any byte, so garbage surfaces as a bad field with its line number.
        text = path.read_bytes().decode("latin-1")
    except OSError as error:
        raise DatasetError(f"{path.name}: cannot be read ({error}). {_HOW_TO_FIX}") from error
    ends_cleanly = text.endswith("\n") or not text
    lines = text.removesuffix("\n").split("\n") if text else []
    rows = [line.removesuffix("\r").split(separator) for line in lines]
    for number, row in enumerate(rows, 1):
        if len(row) != len(fields):
            hint = f" — {_TRUNCATED}" if number == len(rows) and not ends_cleanly else ""
            raise DatasetError(
                f"{path.name}: line {number} has {len(row)} fields, expected {len(fields)} "
                f"({', '.join(fields)}){hint}"
            )
    if expected is not None and len(rows) != expected:
        hint = _TRUNCATED if len(rows) < expected else "is this a different MovieLens release?"
        raise DatasetError(f"{path.name}: {len(rows):,} {noun}, expected {expected:,} — {hint}")
    return np.array(rows, dtype=str).reshape(len(rows), len(fields))


def _integers(file: str, table: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """``table[:, columns]`` as int64; the first bad cell is reported with its line."""
    cells = table[:, list(columns)]
    try:
        return cells.astype(np.int64)
    except (ValueError, OverflowError):
        # numpy parses like int(), so replaying int() finds the cell it rejected.
        for number, row in enumerate(cells.tolist(), 1):
            for column, cell in zip(columns, row, strict=True):
                try:
                    np.int64(int(cell))
                except (ValueError, OverflowError):
                    what = f"line {number} has {_FIELDS[file][column]} {cell!r}"
                    raise DatasetError(f"{file}: {what}, expected an integer") from None
        raise


def _by_id(file: str, ids: np.ndarray, rows: np.ndarray, noun: str) -> np.ndarray:
    """``rows`` reordered so row ``id - 1`` has that id; ids must be ``1..len(ids)`` once each."""
    seen: set[int] = set()
    for number, value in enumerate(ids.tolist(), 1):
        if value in seen or not 1 <= value <= len(ids):
            what = f"line {number} has {noun} id {value}"
            raise DatasetError(f"{file}: {what}, expected each of 1..{len(ids)} once")
        seen.add(value)
    reordered = np.empty_like(rows)
    reordered[ids - 1] = rows
    return reordered
