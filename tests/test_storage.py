"""Caches at fsspec URLs (``memory://``, ``file://``): the same cache, the same certificate, the same checks."""

import importlib.util
import re
import uuid

import numpy as np
import pytest

import calibrate
from calibrate._storage import Remote

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("fsspec.implementations.memory")


@pytest.fixture(scope="module")
def cache():
    return calibrate.synthetic_cache(120, n_layers=5, seed=11)


@pytest.fixture
def url():
    """A fresh ``memory://`` directory, removed afterwards."""
    name = f"/calibrate-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def test_memory_round_trip(cache, url):
    target = cache.save(url)
    assert isinstance(target, Remote) and str(target) == url
    again = calibrate.open_cache(url)
    assert again.checksum == cache.checksum and again.vocab == cache.vocab
    for name, a in cache.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], a)
    assert again.sequences.equals(cache.sequences)


def test_chunked_fit_at_a_url_equals_the_in_memory_certificate(cache, url):
    pytest.importorskip("dask")
    cache.save(url)
    lazy = calibrate.open_cache(url, chunks=25)
    assert str(lazy.path) == url and lazy.n_tokens == cache.n_tokens
    np.testing.assert_array_equal(lazy.arrays()["softmax_gap"].compute(), cache.arrays["softmax_gap"])
    for consistency in ("token", "rouge_l"):
        kwargs = dict(delta=0.2, epsilon=0.1, consistency=consistency)
        assert calibrate.fit(lazy, **kwargs) == calibrate.fit(cache, **kwargs)


def test_a_sharded_cache_at_a_url_opens_in_memory_and_lazily(cache, url, tmp_path):
    from calibrate.shards import shard_name, write_manifest

    cache.subset(range(50)).save(tmp_path / shard_name(0, 2))
    cache.subset(range(50, 120)).save(tmp_path / shard_name(1, 2))
    write_manifest(tmp_path, 2)
    fsspec.filesystem("memory").put(str(tmp_path), url.removeprefix("memory://"), recursive=True)  # uploaded
    assert calibrate.open_cache(url).checksum == cache.checksum  # was "path must be a str or os.PathLike, got Remote"
    if importlib.util.find_spec("dask") is not None:
        assert calibrate.open_cache(url, chunks=30).checksum == cache.checksum


def test_file_urls_are_local_paths(cache, tmp_path):
    path = cache.save(tmp_path / "c")
    assert calibrate.open_cache(f"file://{path}").checksum == cache.checksum
    lazy = calibrate.open_cache(f"file://{path}", chunks=50)
    assert lazy.path == path.resolve()
    saved = cache.save(f"file://{tmp_path}/d")
    assert saved == tmp_path / "d" and calibrate.open_cache(saved).checksum == cache.checksum


def test_overwrite_rules_at_a_url(cache, url):
    cache.save(url)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cache.save(url)
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)
    other.save(url, overwrite=True)
    assert calibrate.open_cache(url).checksum == other.checksum
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url[len('memory://') :]}-data/notes.txt", b"not a cache")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        cache.save(f"{url}-data", overwrite=True)
    fs.pipe(f"{url[len('memory://') :]}-data/meta.json", b"{}")  # some other tool's meta.json
    with pytest.raises(ValueError, match="refusing to overwrite"):
        cache.save(f"{url}-data", overwrite=True)
    assert fs.cat(f"{url[len('memory://') :]}-data/notes.txt") == b"not a cache"
    fs.rm(f"{url[len('memory://') :]}-data", recursive=True)


class _S3Like(fsspec.implementations.memory.MemoryFileSystem):
    """An in-memory file system whose ``ls`` lists bare names by default, as s3fs's and gcsfs's do."""

    protocol = ("s3like",)

    def ls(self, path, detail=False, **kwargs):
        return super().ls(path, detail=detail, **kwargs)


def test_overwrite_at_a_url_whose_listing_gives_names(cache, url):
    fsspec.register_implementation("s3like", _S3Like, clobber=True)
    target = url.replace("memory://", "s3like://")
    cache.save(target)
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)
    other.save(target, overwrite=True)  # was TypeError: string indices must be integers
    assert calibrate.open_cache(target).checksum == other.checksum


@pytest.mark.parametrize("verify", [True, False])
def test_a_cache_saved_over_while_it_is_read_at_a_url_says_so(cache, url, monkeypatch, verify):
    """Unverified, the arrays of the old cache and of its replacement were returned as one cache."""
    import calibrate.cache as cache_module

    cache.save(url)
    other = calibrate.synthetic_cache(120, n_layers=5, seed=12)  # the same shapes
    read_vocab = cache_module._read_vocab

    def overwritten_meanwhile(root, spec):
        other.save(url, overwrite=True)  # another process saves over it now
        return read_vocab(root, spec)

    monkeypatch.setattr(cache_module, "_read_vocab", overwritten_meanwhile)
    replaced = rf"{url} was replaced \(saved again with overwrite=True\) while it was being read"
    with pytest.raises(ValueError, match=replaced):
        calibrate.open_cache(url, verify=verify)


def test_corruption_at_a_url_names_what_is_wrong(cache, url):
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    cache.save(url)
    chunk = sorted(p for p in fs.find(f"{root}/arrays/softmax_gap") if "/c/" in p)[0]
    fs.pipe(chunk, b"garbage")
    with pytest.raises(ValueError, match="softmax_gap"):
        calibrate.open_cache(url)
    with pytest.raises(ValueError, match="softmax_gap"):
        calibrate.open_cache(url, chunks=10)
    fs.rm_file(chunk)
    with pytest.raises(ValueError, match="array 'softmax_gap' .* missing 1 chunk"):
        calibrate.open_cache(url, chunks=10)
    with pytest.raises(FileNotFoundError, match="no layer cache at memory://"):
        calibrate.open_cache(f"{url}-absent")


def _lose_connection(monkeypatch, at: int) -> list[str]:
    """Make the memory file system's ``at``-th file upload fail; returns the uploaded paths (as it goes)."""
    fs_type = type(fsspec.filesystem("memory"))
    real = fs_type.put_file
    count = []

    def flaky(self, lpath, rpath, **kwargs):
        count.append(rpath)
        if len(count) == at:
            raise OSError("connection lost")
        return real(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(fs_type, "put_file", flaky)
    return count


def test_an_interrupted_upload_is_not_a_cache(cache, url, monkeypatch):
    """meta.json goes up last, and a failed upload is removed: nothing half-written is ever read."""
    count = _lose_connection(monkeypatch, at=5)
    with pytest.raises(OSError, match="connection lost"):
        cache.save(url)
    monkeypatch.undo()
    assert not any(p.endswith("meta.json") for p in count)
    with pytest.raises(FileNotFoundError, match="no layer cache"):  # the failed upload was removed
        calibrate.open_cache(url)
    cache.save(url)
    assert calibrate.open_cache(url).checksum == cache.checksum


def test_a_failed_overwrite_keeps_the_old_cache(cache, url, monkeypatch):
    """The new cache is uploaded beside the old one, which is deleted only once the upload is complete."""
    fs = fsspec.filesystem("memory")
    root = url[len("memory://") :]
    parent, _, name = root.rpartition("/")
    cache.save(url)
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)
    _lose_connection(monkeypatch, at=3)
    with pytest.raises(OSError, match="connection lost"):
        other.save(url, overwrite=True)
    monkeypatch.undo()
    assert calibrate.open_cache(url).checksum == cache.checksum
    assert [p.rpartition("/")[2] for p in fs.ls(parent or "/", detail=False) if name in p] == [name]
    other.save(url, overwrite=True)
    assert calibrate.open_cache(url).checksum == other.checksum
    assert [p.rpartition("/")[2] for p in fs.ls(parent or "/", detail=False) if name in p] == [name]


@pytest.mark.parametrize("failure", [OSError("copy refused"), KeyboardInterrupt()])
def test_a_failed_copy_into_place_names_the_new_cache(cache, url, monkeypatch, failure):
    """Ctrl-C part way (KeyboardInterrupt) stays an interrupt, with the note an error gets in its message (it named
    nothing, the old cache deleted and the new one hidden)."""
    fs = fsspec.filesystem("memory")
    cache.save(url)
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)

    def broken(self, path1, path2, **kwargs):
        raise failure

    monkeypatch.setattr(type(fs), "cp_file", broken)
    with pytest.raises(type(failure)) as info:
        other.save(url, overwrite=True)
    monkeypatch.undo()
    said = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "copying the new one into place failed" in said
    staged = re.search(r"the new cache is complete at (\S+?)(?=: |$)", said, re.M).group(1)
    assert calibrate.open_cache(staged).checksum == other.checksum
    with pytest.raises(ValueError):  # meta.json goes last: the half-copied target is not a valid cache
        calibrate.open_cache(url)
    fs.rm(staged[len("memory://") :], recursive=True)


def test_a_failed_delete_of_the_old_cache_names_the_new_cache(cache, url, monkeypatch):
    fs = fsspec.filesystem("memory")
    cache.save(url)
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)
    real_rm, root = type(fs).rm, url[len("memory://") :]

    def refused(self, path, recursive=False, maxdepth=None):  # after remove() deleted meta.json
        if str(path).rstrip("/") == root:
            raise PermissionError("access denied")
        return real_rm(self, path, recursive=recursive, maxdepth=maxdepth)

    monkeypatch.setattr(type(fs), "rm", refused)
    with pytest.raises(OSError, match=r"deleting the old cache at .* failed part way.*PermissionError") as info:
        other.save(url, overwrite=True)
    monkeypatch.undo()
    staged = re.search(r"the new cache is complete at (\S+):", str(info.value)).group(1)
    assert calibrate.open_cache(staged).checksum == other.checksum
    fs.rm(staged[len("memory://") :], recursive=True)


def test_what_save_returns_and_a_lazy_cache_holds_open_and_save_again(cache, url):
    where = cache.save(url)
    assert calibrate.open_cache(where).checksum == cache.checksum  # was TypeError: got Remote
    lazy = calibrate.open_cache(url, chunks=10)
    assert calibrate.open_cache(lazy.path).checksum == cache.checksum
    other = calibrate.synthetic_cache(30, n_layers=3, seed=1)
    assert str(other.save(where, overwrite=True)) == url
    assert calibrate.open_cache(where).checksum == other.checksum


def test_cli_fit_reads_a_url(cache, url, tmp_path, capsys):
    from calibrate.cli import main

    cache.save(url)
    assert main(["fit", url, "--delta", "0.2", "--epsilon", "0.1", "-o", str(tmp_path / "c.json")]) == 0
    assert calibrate.Certificate.from_json(tmp_path / "c.json") == calibrate.fit(cache, delta=0.2, epsilon=0.1)
    capsys.readouterr()


def test_unknown_protocols_name_the_missing_package():
    with pytest.raises((ImportError, ValueError), match="(?i)protocol|install"):
        calibrate.open_cache("nosuchprotocol://bucket/cache")
