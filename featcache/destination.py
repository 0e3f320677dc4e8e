"""What is at an `--out` before lst writes there, and the one way lst deletes a store.

Every command that writes a store (`lst extract`, `lst import`) asks `describe` first and deletes
only through `remove_store`, for local paths and fsspec URLs alike (memory://, file://, s3://, ...).
A `file://` URL is treated exactly like the local path it names. The rule: lst replaces what it
wrote (a Zarr group whose attribute `lst` holds a manifest, or a bare group, i.e. one of ours killed
before its manifest), only when asked (`--overwrite`), and never touches anything else.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import store as S
from .errors import StoreError, expected

log = logging.getLogger(__name__)

ZARR_JSON = "zarr.json"
IMPORTING = "importing"  # manifest flag of a store `lst import` has not finished
# zarr's LocalStore writes `<name>.<32 hex>.partial` and renames it; a kill can leave one behind
_ZARR_TEMP = re.compile(r"^zarr\.[0-9a-f]{32}\.partial$")
SOMETHING_ELSE_HINT = "Choose another --out; lst never deletes what it did not write."


@dataclass(frozen=True)
class Destination:
    """What `describe` found at an --out."""

    out: str
    exists: bool = False
    holds_anything: bool = False  # a file, or a folder / prefix with at least one entry
    manifest: dict[str, Any] | None = None  # set when this is an lst store
    bare: bool = False  # an empty Zarr group, no attributes and no members: ours, killed before its manifest
    foreign: tuple[str, ...] = field(default=())  # files in the store's root that Zarr did not write

    @property
    def is_store(self) -> bool:
        return self.manifest is not None

    @property
    def writable(self) -> bool:
        """True when a fresh store may be written here as is (nothing there, an empty folder, a bare group)."""
        return not self.holds_anything or self.bare


def local_path(out: str) -> Path | None:
    """The local path an --out names (a plain path or a file:// URL); None for any other URL."""
    if "://" not in out:
        return Path(out)
    if out.startswith("file://"):
        return Path(out[len("file://"):] or "/")
    return None


def zarr_location(out: str) -> str:
    """What to hand to zarr: the local path for paths and file:// URLs (zarr's LocalStore creates
    folders and writes atomically; its fsspec store over file:// does neither), else the URL."""
    path = local_path(out)
    return str(path) if path is not None else out


def unreachable(out: str, err: BaseException) -> StoreError:
    text = (str(err).strip().splitlines() or [""])[0]
    return StoreError(expected(f"a readable --out at '{out}'", f"{type(err).__name__}: {text}" if text
                               else type(err).__name__,
                               "Check the path or URL, its credentials and the network."))


def filesystem(out: str):
    """(fsspec filesystem, root path) for a URL."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(out)
    except Exception as err:  # an unknown protocol or a missing driver (s3fs, gcsfs, ...)
        raise unreachable(out, err) from err


def _listing(out: str) -> tuple[bool, bool, dict[str, str] | None, Any]:
    """(exists, is a file, {entry name: 'file' | 'directory'} of a folder, a reader of root files)."""
    path = local_path(out)
    if path is not None:
        if not path.exists():
            return False, False, None, None
        if not path.is_dir():
            return True, True, None, None
        entries = {p.name: "directory" if p.is_dir() else "file" for p in path.iterdir()}
        return True, False, entries, lambda name: (path / name).read_bytes()
    fs, root = filesystem(out)
    root = root.rstrip("/")
    if not fs.exists(root):
        return False, False, None, None
    if fs.isfile(root):
        return True, True, None, None
    entries = {}
    for info in fs.ls(root, detail=True):
        name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
        if name:
            entries[name] = "directory" if info.get("type") == "directory" else "file"
    return True, False, entries, lambda name: fs.cat_file(f"{root}/{name}")


def describe(out: str) -> Destination:
    """What is at `out` (a local path or any fsspec URL). Unreachable filesystems raise a StoreError."""
    out = str(out)
    try:
        exists, is_file, entries, read = _listing(out)
        if not exists:
            return Destination(out)
        if is_file or not entries:
            return Destination(out, exists=True, holds_anything=is_file)
        if entries.get(ZARR_JSON) != "file":
            return Destination(out, exists=True, holds_anything=True)
        raw = read(ZARR_JSON)
    except StoreError:
        raise
    except Exception as err:  # OSError, a driver's connection or permission error
        raise unreachable(out, err) from err
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return Destination(out, exists=True, holds_anything=True)
    attributes = meta.get("attributes") or {}
    manifest = attributes.get(S.MANIFEST_KEY) if isinstance(attributes, dict) else None
    members = [name for name in entries if name != ZARR_JSON and not _ZARR_TEMP.match(name)]
    foreign = tuple(sorted(n for n in members if entries[n] == "file"))
    return Destination(out, exists=True, holds_anything=True,
                       manifest=manifest if isinstance(manifest, dict) else None,
                       bare=not attributes and not members, foreign=foreign)


def _something_else(out: str) -> StoreError:
    return StoreError(expected("an empty directory or an lst store at --out", f"'{out}', which holds something else",
                               SOMETHING_ELSE_HINT))


def _check_ours(found: Destination) -> None:
    if not (found.is_store or found.bare):
        raise _something_else(found.out)
    if found.foreign:
        shown = ", ".join(found.foreign[:3]) + (", ..." if len(found.foreign) > 3 else "")
        raise StoreError(expected("an lst store holding only what lst wrote at --out",
                                  f"'{found.out}' with other files in it ({shown})",
                                  "Move them out first; lst never deletes what it did not write."))


def remove_store(out: str) -> None:
    """Delete the lst store (or bare group) at `out`, and nothing else; no-op when nothing is there.

    Local paths and file:// URLs are renamed to a hidden sibling first (atomic: a kill during the
    delete leaves no half store at `out`, only a hidden folder), then deleted. Other URLs get one
    fsspec `rm(recursive=True)` of that root.
    """
    out = str(out)
    found = describe(out)
    if not found.exists:
        return
    _check_ours(found)
    path = local_path(out)
    try:
        if path is not None:
            if path.is_symlink():
                raise StoreError(expected("a folder at --out", f"'{out}', a symbolic link",
                                          "Point --out at the folder itself."))
            doomed = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex[:8]}")
            path.rename(doomed)
            try:
                shutil.rmtree(doomed)
            except OSError as err:
                raise StoreError(f"The old store at '{out}' was moved aside to '{doomed}' but could not be "
                                 f"deleted ({type(err).__name__}: {err}); delete that folder yourself.") from err
        else:
            fs, root = filesystem(out)
            fs.rm(root.rstrip("/"), recursive=True)  # never shutil on a URL
    except StoreError:
        raise
    except Exception as err:  # OSError, a driver's connection or permission error
        raise unreachable(out, err) from err
    log.info("Removed the store at %s", out)


def prepare_out(out: str, overwrite: bool, what: str = "store") -> None:
    """Make `out` ready for a fresh store: fine when empty or a bare group; an lst store is replaced
    with `overwrite`, refused without; anything else is refused and left untouched."""
    out = str(out)
    found = describe(out)
    if found.writable:
        return
    if not found.is_store:
        raise _something_else(out)
    crashed_import = bool(found.manifest.get(IMPORTING)) and not found.manifest.get("complete")
    if not overwrite and not crashed_import:  # a killed import is redone by the same command
        raise StoreError(f"A {what} already exists at '{out}'. Pass --overwrite to replace it.")
    remove_store(out)
