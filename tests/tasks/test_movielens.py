"""MovieLens-100K loading and download, on small random copies written in the original format."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coevo.tasks.log import DatasetError
from coevo.tasks.movielens import (
    EXPECTED_COUNTS,
    GROUPLENS_URL,
    default_cache_dir,
    download_movielens_100k,
    find_movielens_100k,
    load_movielens_100k,
    resolve_data_dir,
)

NUM_USERS, NUM_ITEMS, NUM_RATINGS = 30, 40, 600
SMALL = {"ratings": NUM_RATINGS, "users": NUM_USERS, "items": NUM_ITEMS}
# Assigned round-robin so every one is present and the sorted vocabulary is this tuple.
OCCUPATIONS = ("artist", "doctor", "none", "student", "writer")
REAL_DATA = os.environ.get("COEVO_DATA", "")


@dataclass(frozen=True)
class FakeMovieLens:
    """A written fake copy and the 1-based values written into it."""

    folder: Path
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    genres: np.ndarray


def write_fake_movielens(folder: Path, seed: int = 0) -> FakeMovieLens:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    ages = rng.integers(7, 74, NUM_USERS)
    ages[:3] = (18, 17, 56)
    genders = rng.choice(["F", "M"], NUM_USERS)
    genders[:3] = ("F", "M", "M")
    users = [
        f"{index + 1}|{ages[index]}|{genders[index]}|{OCCUPATIONS[index % len(OCCUPATIONS)]}|"
        f"{rng.integers(10_000, 99_999)}\n"
        for index in range(NUM_USERS)
    ]
    (folder / "u.user").write_text("".join(users), encoding="latin-1")

    genres = rng.integers(0, 2, (NUM_ITEMS, 19))
    items = []
    for index in range(NUM_ITEMS):
        title, date = f"Movie {index + 1} (1995)", "01-Jan-1995"
        if index == 0:
            title = "Amélie (2001)"
        if index == 1:  # as item 267 of the real file: no title, no dates, no URL
            title, date = "unknown", ""
        url = f"http://us.imdb.com/M/title-exact?Movie%20{index + 1}" if date else ""
        flags = "|".join(str(flag) for flag in genres[index])
        items.append(f"{index + 1}|{title}|{date}||{url}|{flags}\n")
    (folder / "u.item").write_bytes("".join(items).encode("latin-1"))

    pairs = rng.choice(NUM_USERS * NUM_ITEMS, NUM_RATINGS, replace=False)
    user, item = pairs // NUM_ITEMS + 1, pairs % NUM_ITEMS + 1
    rating = rng.integers(1, 6, NUM_RATINGS)
    timestamp = rng.integers(874_724_710, 893_286_638, NUM_RATINGS)
    rows = zip(user, item, rating, timestamp, strict=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return FakeMovieLens(folder, user, item, rating, timestamp, genres)


def zip_movielens(folder: Path, archive: Path, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Zip ``folder`` as GroupLens does: members under ``ml-100k/``, plus files we ignore."""
    with zipfile.ZipFile(archive, "w", compression=compression) as bundle:
        for name in ("u.data", "u.item", "u.user"):
            bundle.write(folder / name, f"ml-100k/{name}")
        bundle.writestr("ml-100k/README", "fake MovieLens for tests\n")
    return archive


def edit_line(path: Path, number: int, change: Callable[[list[str]], list[str]]) -> None:
    """Rewrite line ``number`` (1-based) of ``path`` by ``change`` on its fields."""
    separator = "\t" if path.name == "u.data" else "|"
    lines = path.read_bytes().decode("latin-1").split("\n")
    lines[number - 1] = separator.join(change(lines[number - 1].split(separator)))
    path.write_bytes("\n".join(lines).encode("latin-1"))


def set_field(column: int, value: str) -> Callable[[list[str]], list[str]]:
    return lambda fields: [*fields[:column], value, *fields[column + 1 :]]


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep a developer's COEVO_DATA or cache from leaking into the tests."""
    monkeypatch.delenv("COEVO_DATA", raising=False)
    monkeypatch.setenv("COEVO_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def fake(tmp_path: Path) -> FakeMovieLens:
    return write_fake_movielens(tmp_path / "data" / "ml-100k")


@pytest.fixture
def archive(fake: FakeMovieLens, tmp_path: Path) -> Path:
    (tmp_path / "served").mkdir()
    return zip_movielens(fake.folder, tmp_path / "served" / "ml-100k.zip")


@dataclass(frozen=True)
class Server:
    url: str
    requests: list[str]


@pytest.fixture
def server(archive: Path) -> Iterator[Server]:
    """Serves the folder holding ``archive`` on 127.0.0.1 and records each request path."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Handler, directory=str(archive.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll keeps shutdown() from waiting out the default half second.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_port}/{archive.name}", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_constants() -> None:
    assert GROUPLENS_URL == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert dict(EXPECTED_COUNTS) == {"ratings": 100_000, "users": 943, "items": 1_682}


def test_load_parses_ratings_with_zero_based_ids(fake: FakeMovieLens) -> None:
    log = load_movielens_100k(fake.folder.parent, expected=SMALL)
    assert (log.name, log.num_users, log.num_items, log.num_rows) == (
        "movielens-100k",
        NUM_USERS,
        NUM_ITEMS,
        NUM_RATINGS,
    )
    np.testing.assert_array_equal(log.user, fake.user - 1)
    np.testing.assert_array_equal(log.item, fake.item - 1)
    np.testing.assert_array_equal(log.rating, fake.rating)
    np.testing.assert_array_equal(log.timestamp, fake.timestamp)
    assert (log.user.dtype, log.item.dtype) == (np.int64, np.int64)
    assert (log.rating.dtype, log.timestamp.dtype) == (np.float32, np.int64)
    assert log.info["source"] == str(fake.folder)


def test_item_features_are_the_genre_flags(fake: FakeMovieLens) -> None:
    log = load_movielens_100k(fake.folder.parent, expected=SMALL)
    assert log.item_features is not None
    assert log.item_features.dtype == np.float32
    np.testing.assert_array_equal(log.item_features, fake.genres)
    names = log.info["item_feature_names"]
    assert isinstance(names, list)
    assert (len(names), names[0], names[4], names[-1]) == (19, "unknown", "Children's", "Western")
    assert "Amélie (2001)" in (fake.folder / "u.item").read_bytes().decode("latin-1")


def test_user_features_one_hot_age_gender_occupation(fake: FakeMovieLens) -> None:
    log = load_movielens_100k(fake.folder.parent, expected=SMALL)
    features = log.user_features
    assert features is not None
    assert (features.shape, features.dtype) == ((NUM_USERS, 7 + 2 + 5), np.float32)
    np.testing.assert_array_equal(features.sum(axis=1), np.full(NUM_USERS, 3.0))
    # Columns: 7 age buckets, then F, M (7, 8), then artist, doctor, none, student, writer (9..13).
    assert np.flatnonzero(features[0]).tolist() == [1, 7, 9]  # 18, F, artist
    assert np.flatnonzero(features[1]).tolist() == [0, 8, 10]  # 17, M, doctor
    assert np.flatnonzero(features[2]).tolist() == [6, 8, 11]  # 56, M, none
    names = log.info["user_feature_names"]
    assert isinstance(names, list)
    assert names[:3] == ["age_<18", "age_18-24", "age_25-34"]
    assert names[6:10] == ["age_56+", "gender_F", "gender_M", "occupation_artist"]
    assert len(names) == features.shape[1]


def test_rows_are_placed_by_id_not_by_line(fake: FakeMovieLens) -> None:
    in_order = load_movielens_100k(fake.folder, expected=SMALL)
    path = fake.folder / "u.user"
    path.write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    reversed_file = load_movielens_100k(fake.folder, expected=SMALL)
    assert in_order.user_features is not None and reversed_file.user_features is not None
    np.testing.assert_array_equal(reversed_file.user_features, in_order.user_features)


def test_finds_both_layouts(fake: FakeMovieLens) -> None:
    assert find_movielens_100k(fake.folder.parent) == fake.folder
    assert find_movielens_100k(str(fake.folder)) == fake.folder


def test_data_dir_resolution(fake: FakeMovieLens, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("COEVO_DATA", str(fake.folder.parent))
    assert resolve_data_dir(None) == fake.folder.parent
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")
    assert load_movielens_100k(expected=SMALL).info["source"] == str(fake.folder)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_cache_dir() == tmp_path / "default-cache"
    monkeypatch.delenv("COEVO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "coevo"


def test_without_data_dir_the_download_cache_is_used(fake: FakeMovieLens, tmp_path: Path) -> None:
    shutil.copytree(fake.folder, tmp_path / "default-cache" / "ml-100k")
    assert find_movielens_100k(None) == tmp_path / "default-cache" / "ml-100k"


@pytest.mark.parametrize("given", [True, False])
def test_missing_folder_says_where_it_looked_and_how_to_fix(tmp_path: Path, given: bool) -> None:
    data_dir = tmp_path / "nowhere" if given else None
    with pytest.raises(DatasetError) as caught:
        find_movielens_100k(data_dir)
    message = str(caught.value)
    looked_in = tmp_path / ("nowhere" if given else "default-cache")
    assert str(looked_in / "ml-100k") in message
    assert "u.data" in message
    for fix in ("--data-dir", "COEVO_DATA", "coevo data download movielens-100k"):
        assert fix in message


def test_missing_file_is_named(fake: FakeMovieLens) -> None:
    (fake.folder / "u.item").unlink()
    with pytest.raises(DatasetError, match=r"missing u\.item"):
        load_movielens_100k(fake.folder.parent, expected=SMALL)


def test_truncated_ratings(fake: FakeMovieLens) -> None:
    path = fake.folder / "u.data"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-10]))
    with pytest.raises(DatasetError, match=r"u\.data: 590 ratings, expected 600 .*truncated"):
        load_movielens_100k(fake.folder, expected=SMALL)


def test_file_cut_mid_line_is_called_truncated(fake: FakeMovieLens) -> None:
    path = fake.folder / "u.data"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"u\.data: line 600 has \d fields.*truncated"):
        load_movielens_100k(fake.folder, expected=SMALL)


def test_more_rows_than_expected(fake: FakeMovieLens) -> None:
    with pytest.raises(DatasetError, match=r"u\.user: 30 users, expected 29"):
        load_movielens_100k(fake.folder, expected={**SMALL, "users": 29})


@pytest.mark.parametrize(
    ("file", "line", "change", "message"),
    [
        ("u.data", 5, lambda fields: fields[:3], r"u\.data: line 5 has 3 fields, expected 4 \("),
        ("u.data", 7, set_field(2, "x"), r"u\.data: line 7 has rating 'x', expected an integer"),
        ("u.data", 8, set_field(2, "4.5"), r"u\.data: line 8 has rating '4\.5'"),
        ("u.data", 9, set_field(3, ""), r"u\.data: line 9 has timestamp '', expected an integer"),
        ("u.data", 10, set_field(2, "6"), r"u\.data: line 10 has rating 6, expected 1\.\.5"),
        ("u.data", 11, set_field(1, "41"), r"u\.data: line 11 has item 41, not in u\.item"),
        ("u.data", 12, set_field(0, "0"), r"u\.data: line 12 has user 0, not in u\.user"),
        ("u.item", 3, set_field(6, "2"), r"u\.item: line 3 has Action flag 2, expected 0 or 1"),
        ("u.item", 4, lambda fields: fields[:-1], r"u\.item: line 4 has 23 fields, expected 24"),
        ("u.user", 2, set_field(0, "1"), r"u\.user: line 2 has user id 1, expected each of"),
        ("u.user", 6, set_field(2, "X"), r"u\.user: line 6 has gender 'X', expected F or M"),
        ("u.user", 7, set_field(1, "old"), r"u\.user: line 7 has age 'old', expected an integer"),
    ],
)
def test_malformed_line_is_named(
    fake: FakeMovieLens,
    file: str,
    line: int,
    change: Callable[[list[str]], list[str]],
    message: str,
) -> None:
    edit_line(fake.folder / file, line, change)
    with pytest.raises(DatasetError, match=message):
        load_movielens_100k(fake.folder, expected=SMALL)


def test_unknown_expectation_key_is_rejected(fake: FakeMovieLens) -> None:
    with pytest.raises(ValueError, match="rating"):
        load_movielens_100k(fake.folder, expected={"rating": 600})


def test_download_from_file_url(archive: Path, tmp_path: Path, fake: FakeMovieLens) -> None:
    cache = tmp_path / "cache"
    assert download_movielens_100k(cache, url=archive.as_uri(), expected=SMALL) == cache
    assert sorted(os.listdir(cache)) == ["ml-100k"]
    assert sorted(os.listdir(cache / "ml-100k")) == ["u.data", "u.item", "u.user"]
    log = load_movielens_100k(cache, expected=SMALL)
    np.testing.assert_array_equal(log.user, fake.user - 1)


def test_download_over_http(server: Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    download_movielens_100k(cache, url=server.url, expected=SMALL)
    assert server.requests == ["/ml-100k.zip"]
    assert load_movielens_100k(cache, expected=SMALL).num_rows == NUM_RATINGS


def test_download_skipped_when_cache_is_valid(
    server: Server, fake: FakeMovieLens, tmp_path: Path
) -> None:
    shutil.copytree(fake.folder, tmp_path / "cache" / "ml-100k")
    download_movielens_100k(tmp_path / "cache", url=server.url, expected=SMALL)
    assert server.requests == []


def test_download_replaces_a_damaged_cache(
    server: Server, fake: FakeMovieLens, tmp_path: Path
) -> None:
    cached = tmp_path / "cache" / "ml-100k"
    shutil.copytree(fake.folder, cached)
    (cached / "u.data").write_text("1\t1\t5\t874724710\n")
    download_movielens_100k(tmp_path / "cache", url=server.url, expected=SMALL)
    assert server.requests == ["/ml-100k.zip"]
    assert sorted(os.listdir(tmp_path / "cache")) == ["ml-100k"]
    assert load_movielens_100k(tmp_path / "cache", expected=SMALL).num_rows == NUM_RATINGS


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupted_zip_is_rejected_and_cleaned_up(
    fake: FakeMovieLens, tmp_path: Path, compression: int
) -> None:
    archive = zip_movielens(fake.folder, tmp_path / "bad.zip", compression)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        member = bundle.getinfo("ml-100k/u.data")
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 :][:4])
    middle = member.header_offset + 30 + name_length + extra_length + member.compress_size // 2
    data[middle : middle + 4] = bytes(byte ^ 0xFF for byte in data[middle : middle + 4])
    archive.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "keep.txt").write_text("already here")
    with pytest.raises(DatasetError, match=r"CRC|corrupt") as caught:
        download_movielens_100k(cache, url=archive.as_uri(), expected=SMALL)
    assert archive.as_uri() in str(caught.value)
    assert os.listdir(cache) == ["keep.txt"]


def test_not_a_zip(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html>Moved</html>")
    with pytest.raises(DatasetError, match="not a zip"):
        download_movielens_100k(tmp_path / "cache", url=page.as_uri(), expected=SMALL)
    assert os.listdir(tmp_path / "cache") == []


def test_zip_without_movielens_members(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("ml-1m/ratings.dat", "1::1::5::978300760\n")
    with pytest.raises(DatasetError, match=r"has no ml-100k/u\.data"):
        download_movielens_100k(tmp_path / "cache", url=archive.as_uri(), expected=SMALL)


def test_http_error_names_url_and_status(server: Server, tmp_path: Path) -> None:
    url = server.url.replace("ml-100k.zip", "missing.zip")
    with pytest.raises(DatasetError, match="HTTP 404") as caught:
        download_movielens_100k(tmp_path / "cache", url=url, expected=SMALL)
    assert url in str(caught.value)
    assert os.listdir(tmp_path / "cache") == []


def test_download_failing_verification_leaves_nothing(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unusable: u\.data: 600 ratings, expected 601"):
        download_movielens_100k(
            tmp_path / "cache", url=archive.as_uri(), expected={**SMALL, "ratings": 601}
        )
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.integration
@pytest.mark.skipif(
    not (REAL_DATA and (Path(REAL_DATA) / "ml-100k").is_dir()),
    reason="set COEVO_DATA to a folder holding ml-100k/ to run on the real data",
)
def test_real_movielens_100k() -> None:
    log = load_movielens_100k(REAL_DATA)
    assert (log.num_users, log.num_items, log.num_rows) == (943, 1_682, 100_000)
    assert abs(float((log.rating >= 4).mean()) - 0.554) <= 0.001
