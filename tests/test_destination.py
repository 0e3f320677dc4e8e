"""featcache.destination: one guard for every --out, local paths and fsspec URLs alike.

`lst import` used to replace a store at a URL without --overwrite, and on a file:// folder it deleted
the folder and the user's files in it before crashing with a traceback.
"""

from __future__ import annotations

import uuid

import pytest
import zarr
from conftest import assert_user_error, invoke

from featcache import LstError
from featcache import store as S
from featcache.destination import describe, prepare_out, remove_store, zarr_location
from featcache.hdf5 import export_hdf5

MARK = "sentinel"  # an array put into an existing store: still there if it was kept, gone if replaced


@pytest.fixture(scope="module")
def h5(tiny_store, tmp_path_factory):
    return export_hdf5(tiny_store, tmp_path_factory.mktemp("h5") / "store.h5")


def location(kind: str, tmp_path) -> str:
    """A fresh --out of the given kind: a local path, a file:// URL, a memory:// URL."""
    name = f"store-{uuid.uuid4().hex[:8]}"
    if kind == "path":
        return str(tmp_path / name)
    if kind == "file":
        return f"file://{tmp_path / name}"
    return f"memory://lst-destination/{name}"


def make_store(out: str, manifest: dict | None = None) -> None:
    root = zarr.open_group(zarr_location(out), mode="w")  # zarr's fsspec store cannot create file:// folders
    root.attrs[S.MANIFEST_KEY] = manifest or {"format_version": S.FORMAT_VERSION, "complete": True}
    root.create_array(MARK, shape=(3,), dtype="int8")


def has_mark(out: str) -> bool:
    return MARK in zarr.open_group(out, mode="r")


KINDS = ("path", "file", "memory")


@pytest.mark.parametrize("kind", KINDS)
def test_describe(kind, tmp_path):
    out = location(kind, tmp_path)
    found = describe(out)
    assert not found.exists and not found.holds_anything and found.manifest is None and found.writable
    zarr.open_group(zarr_location(out), mode="w")
    found = describe(out)
    assert found.exists and found.bare and found.manifest is None and found.writable
    make_store(out, {"format_version": S.FORMAT_VERSION, "complete": False, "kind": "encoder"})
    found = describe(out)
    assert found.is_store and found.manifest["kind"] == "encoder" and not found.bare and not found.writable
    assert found.foreign == ()


def test_describe_local_things_that_are_not_stores(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (str(empty), f"file://{empty}"):
        found = describe(out)
        assert found.exists and not found.holds_anything and found.writable
    (tmp_path / "a.txt").write_text("x")
    for out in (str(tmp_path / "a.txt"), f"file://{tmp_path / 'a.txt'}"):
        found = describe(out)
        assert found.holds_anything and not found.is_store and not found.writable
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    assert not describe(str(junk)).is_store and describe(str(junk)).holds_anything
    array = zarr.create_array(str(tmp_path / "arr"), shape=(2,), dtype="int8")
    assert array is not None and not describe(str(tmp_path / "arr")).is_store


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_out_and_remove_store(kind, tmp_path):
    out = location(kind, tmp_path)
    prepare_out(out, overwrite=False)  # nothing there: fine, nothing created
    assert not describe(out).exists
    make_store(out)
    with pytest.raises(LstError, match=r"A store already exists at .* Pass --overwrite"):
        prepare_out(out, overwrite=False)
    assert has_mark(out)
    prepare_out(out, overwrite=True)
    assert not describe(out).holds_anything
    make_store(out)
    remove_store(out)
    assert not describe(out).holds_anything
    remove_store(out)  # nothing there: nothing to do


def test_local_remove_leaves_no_sibling(tmp_path):
    out = tmp_path / "s"
    make_store(str(out))
    remove_store(str(out))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ("path", "file"))
def test_user_folder_is_never_removed(kind, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    out = str(folder) if kind == "path" else f"file://{folder}"
    for overwrite in (False, True):
        with pytest.raises(LstError, match="holds something else"):
            prepare_out(out, overwrite=overwrite)
    with pytest.raises(LstError, match="holds something else"):
        remove_store(out)
    # a store with a user's file dropped into its root: not replaced either
    make_store(str(tmp_path / "s"))
    (tmp_path / "s" / "todo.txt").write_text("mine")
    with pytest.raises(LstError, match="todo.txt"):
        prepare_out(str(tmp_path / "s"), overwrite=True)
    assert (folder / "notes.txt").read_text() == "precious" and (tmp_path / "s" / "todo.txt").exists()
    assert has_mark(str(tmp_path / "s"))


def test_unreachable_destination_is_one_store_error(tmp_path, monkeypatch):
    from pathlib import Path

    from fsspec.implementations.memory import MemoryFileSystem

    with pytest.raises(LstError, match="readable --out"):
        describe("nosuchprotocol://bucket/store")

    class EndpointConnectionError(Exception):  # what a cloud driver raises: not an OSError
        pass

    def offline(self, path, **kwargs):
        raise EndpointConnectionError("Could not connect to the endpoint URL\nmore detail")

    monkeypatch.setattr(MemoryFileSystem, "exists", offline)
    with pytest.raises(LstError, match=r"EndpointConnectionError: Could not connect to the endpoint URL\.") as err:
        prepare_out("memory://lst-destination/offline", overwrite=True)
    assert "\n" not in str(err.value)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    (tmp_path / "d").mkdir()
    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(LstError, match="PermissionError"):
        describe(str(tmp_path / "d"))


@pytest.mark.parametrize("kind", ("file", "memory"))
def test_import_onto_a_store_at_a_url(kind, h5, tmp_path):
    """Refused without --overwrite (the store untouched), replaced with it; one 'Error:' line."""
    out = location(kind, tmp_path)
    make_store(out)
    r = invoke("import", h5, "--out", out)
    assert_user_error(r, "A store already exists", "--overwrite")
    assert has_mark(out) and zarr.open_group(out, mode="r").attrs[S.MANIFEST_KEY]["complete"]
    r = invoke("import", h5, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    group = zarr.open_group(out, mode="r")
    assert MARK not in group and group.attrs[S.MANIFEST_KEY]["splits"].keys() == {"train", "dev", "test"}
    assert_user_error(invoke("import", h5, "--out", out), "--overwrite")  # now an lst store itself


@pytest.mark.parametrize("kind", ("path", "file", "memory"))
def test_import_to_a_fresh_or_empty_destination(kind, h5, tmp_path):
    out = location(kind, tmp_path)
    if kind != "memory":
        (tmp_path / out.rsplit("/", 1)[-1]).mkdir()  # an empty folder is fine too
    r = invoke("import", h5, "--out", out)
    assert r.exit_code == 0, r.output
    assert zarr.open_group(out, mode="r").attrs[S.MANIFEST_KEY]["complete"]


@pytest.mark.parametrize("kind", ("path", "file"))
def test_import_onto_a_user_folder_keeps_the_files(kind, h5, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    out = str(folder) if kind == "path" else f"file://{folder}"
    for flags in ((), ("--overwrite",)):
        assert_user_error(invoke("import", h5, "--out", out, *flags), "something else", "never deletes")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "precious"


def test_import_to_an_unusable_destination(h5, tmp_path):
    assert_user_error(invoke("import", h5, "--out", "nosuchprotocol://x/y"), "readable --out")
    (tmp_path / "f").write_text("x")
    assert_user_error(invoke("import", h5, "--out", tmp_path / "f" / "store"), "Could not write the store")
