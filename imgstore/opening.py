"""Opening, creating and replacing stores, and the one-writer lock.

Creating (mode ``"w"``, or ``"a"`` where there is no store) never deletes what is not the store's:

1. Under the writer lock, the directory must be empty, or hold a valid manifest (whose ``files``
   name what the old store owns). Anything else (a foreign ``imgstore.json``, a damaged manifest,
   files without a manifest) is refused with :class:`StoreExistsError` before anything is touched.
2. A manifest marked ``creating`` that names the old store's files and the new store's is
   committed first. From here a crash or a full disk leaves a directory that ``"w"`` (or ``"a"``)
   finishes creating, never one it refuses.
3. The old store's files (and only those) are deleted; the new store's files are made under new
   names (a fresh *generation*), so readers of the old store never read the new one's files.
4. The manifest of the new, empty store is committed.
"""

from __future__ import annotations

import math
import operator
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from imgstore.arguments import io_error
from imgstore.checksums import group_size
from imgstore.errors import (
    CorruptStoreError,
    ImgStoreError,
    InvalidImageError,
    InvalidOptionError,
    StoreExistsError,
    StoreNotFoundError,
)
from imgstore.fileio import find_linked_folder
from imgstore.locking import WriterLock, lock_for_writing
from imgstore.manifest import (
    IMAGE_MODES,
    MANIFEST_NAME,
    MAX_CLASSES,
    MAX_DIMS,
    MAX_IMAGE_BYTES,
    WRITER_LOCK_NAME,
    Manifest,
    generation_name,
    manifest_path,
    read_manifest,
    write_manifest,
)
from imgstore.options import check_options, resolve_options
from imgstore.store import Mode, Store

_STORE_FILES = ("checksums.xxh3", "groups.xxh3")  # the store's own, beside the backend's
_LEGACY_STORE_FILES = ("checksums.crc32",)  # format version 1


def open_store(
    path: str | os.PathLike[str],
    backend: str | None = None,
    mode: Mode = "r",
    *,
    shape: Sequence[int] | Literal["auto"] | None = "auto",
    codec: str = "raw",
    quality: int | None = None,
    codec_params: Mapping[str, Any] | None = None,
    image_mode: str | None = None,
    classes: Sequence[str] | None = None,
    downscale: int | None = None,
    decoder: str = "auto",
    sync: bool = True,
    verify_reads: bool = True,
    **options: Any,
) -> Store:
    """Open the store at ``path`` (a directory).

    ``mode``: ``"r"`` read only (writes raise :class:`ReadOnlyError`); ``"a"`` append, creating the
    store if there is none; ``"w"`` create, replacing an existing store (deleting only the files its
    manifest names; never a directory that is not a store). ``backend`` is needed to create; on
    opening it is read from the manifest (giving a different one raises).

    Creating, these are kept in the store: ``codec`` (``raw`` pixels; ``png``, ``jpeg``, ``webp``
    encoded with ``quality`` or ``codec_params``; ``keep``: encoded files stored as given);
    ``shape``: a tuple fixes every image's shape; None lets images vary in shape; ``"auto"``
    (default) is "fixed by the first write" for raw stores and None for encoded ones;
    ``image_mode``: what encoded images decode to, ``"RGB"`` or ``"L"`` (PIL's ``convert``, as
    torchvision's loader does) or None (as stored); ``classes``: class names (label i is
    ``classes[i]``); ``downscale``: N notes that the images were made smaller as ``imgstore convert
    --downscale N`` does (the store resizes nothing; a resumed conversion checks it). ``decoder``
    (``"auto"``, ``"pillow"``, ``"simplejpeg"``, ``"turbojpeg"``) decodes this handle's reads.
    ``sync=False`` skips fsync: faster writes, but the last commits may be lost on power failure.
    ``verify_reads=False`` skips checking each record read against its checksum (see the README for
    what the check costs). ``options`` are the backend's own (see its ``option_specs``): layout
    options are fixed when the store is created.
    """
    from imgstore.registry import get_backend

    if mode not in ("r", "w", "a"):
        raise InvalidOptionError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    for name, flag in (("sync", sync), ("verify_reads", verify_reads)):
        if not isinstance(flag, bool):
            raise InvalidOptionError(f"{name} must be True or False, got {flag!r}")
    store_path = _as_path(path)
    layout = _checked_layout(codec, quality, codec_params, image_mode, classes, shape, downscale)
    reading = _Reading(sync, verify_reads, decoder)
    if mode == "r":
        return _open_existing(store_path, read_manifest(store_path), backend, mode, reading, options, layout)

    cls = get_backend(backend) if backend is not None else None
    if cls is not None:
        _check_kind(cls, layout)
        layout = replace(layout, shape=_checked_shape(cls, layout))
        check_options(cls.name, cls.option_specs, options)  # bad options raise before anything is touched
    _make_directory(store_path)
    _existing_manifest(store_path, mode)  # refuse what is not a store before even the lock file is made
    lock = lock_for_writing(store_path)
    try:
        old = _existing_manifest(store_path, mode)
        if mode == "a" and old is not None and not old.creating:
            store = _open_existing(store_path, old, backend, mode, reading, options, layout, lock)
        else:
            if cls is None:
                if old is None:
                    raise StoreNotFoundError(f"no store at {store_path}; pass backend=... to create one")
                raise InvalidOptionError(f"{store_path} was being created and is empty; pass backend=... to create it")
            store = _create(store_path, cls, old, layout, reading, options, lock)
    except BaseException:
        lock.release()
        raise
    return store


def reopen(
    path: str,
    backend: str,
    mode: Mode,
    sync: bool,
    verify_reads: bool,
    overrides: dict[str, Any],
    decoder: str = "auto",
) -> Store:
    """Unpickle a store: open it again the way it was open."""
    return open_store(path, backend, mode, sync=sync, verify_reads=verify_reads, decoder=decoder, **overrides)


class _Reading(NamedTuple):
    """Settings of one handle."""

    sync: bool
    verify_reads: bool
    decoder: str


@dataclass(frozen=True)
class _Layout:
    """What a new store keeps in its manifest besides the backend's options."""

    codec: str
    codec_params: dict[str, Any]  # resolved: every parameter, defaults included
    given_params: dict[str, Any]  # what the caller gave
    image_mode: str | None
    classes: tuple[str, ...] | None
    shape: tuple[int, ...] | None  # after _checked_shape; before, the caller's value
    varied: bool
    downscale: int | None

    @property
    def encoded(self) -> bool:
        return self.codec != "raw" or self.varied

    def check_against(self, path: Path, manifest: Manifest) -> None:
        """Values given for an existing store must be its own (a default means "whatever it has")."""
        given = {
            "codec": (self.codec, manifest.codec, self.codec != "raw"),
            "codec parameters": (
                self.given_params,
                {k: manifest.codec_params.get(k) for k in self.given_params},
                bool(self.given_params),
            ),
            "image_mode": (self.image_mode, manifest.image_mode, self.image_mode is not None),
            "classes": (self.classes, manifest.classes, self.classes is not None),
            "downscale": (self.downscale, manifest.downscale, self.downscale is not None),
        }
        for name, (want, have, set_) in given.items():
            if set_ and want != have:
                raise InvalidOptionError(f"{path} was created with {name} {have!r}; {want!r} was given")


def _checked_layout(
    codec: str,
    quality: int | None,
    codec_params: Mapping[str, Any] | None,
    image_mode: str | None,
    classes: Sequence[str] | None,
    shape: Any,
    downscale: Any = None,
) -> _Layout:
    params = dict(codec_params or {})
    if quality is not None:
        params["quality"] = quality
    if not isinstance(codec, str):
        raise InvalidOptionError(f"codec must be a codec's name, got {codec!r}")
    if codec == "raw" and not params:
        resolved: dict[str, Any] = {}
    else:
        from imgstore.codecs import get_codec

        resolved = get_codec(codec, **params).params
    if image_mode not in IMAGE_MODES:
        raise InvalidOptionError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    names = None
    if classes is not None:
        if isinstance(classes, str) or not all(isinstance(c, str) and 0 < len(c) <= 1000 for c in classes):
            raise InvalidOptionError("classes must be a sequence of names (strings of 1 to 1 000 characters)")
        names = tuple(classes)
        if len(set(names)) != len(names):
            raise InvalidOptionError("classes must be distinct names")
        # What the manifest reader takes (it refuses more): a store must reopen after its writes.
        if (
            len(names) > MAX_CLASSES
            or sum(len(name.encode("utf-8", "surrogateescape")) + 8 for name in names) > 1 << 19
        ):
            raise InvalidOptionError(
                f"at most {MAX_CLASSES} classes of at most 512 KiB of names in all; got {len(names)}"
            )
    if isinstance(shape, str) and shape != "auto":
        raise InvalidOptionError(f"shape must be a tuple of sizes, None or 'auto', got {shape!r}")
    varied = shape is None or (shape == "auto" and codec != "raw")
    fixed = None if isinstance(shape, str) or shape is None else shape
    from imgstore.codecs.downscale import checked_shorter_side

    return _Layout(codec, resolved, params, image_mode, names, fixed, varied, checked_shorter_side(downscale))


def _check_kind(cls: type[Store], layout: _Layout) -> None:
    """A backend without the encoded primitives (memmap) holds raw pixels of one shape: refuse others up front."""
    if not layout.encoded or cls.has_encoded_primitives():
        return
    if layout.codec != "raw":
        raise InvalidOptionError(
            f"the {cls.name} backend cannot hold encoded images (codec {layout.codec!r}): it holds raw pixels "
            "of one shape (codec='raw')"
        )
    raise InvalidImageError(
        f"the {cls.name} backend cannot hold images of varied shapes (shape=None): give shape=(H, W, C) or 'auto'"
    )


def _checked_shape(cls: type[Store], layout: _Layout) -> tuple[int, ...] | None:
    shape = layout.shape
    if shape is None:
        return None
    try:
        image_shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise InvalidImageError(f"shape must be a sequence of integers, got {shape!r}") from None
    if not 1 <= len(image_shape) <= MAX_DIMS or min(image_shape) < 1 or any(isinstance(s, bool) for s in shape):
        raise InvalidImageError(f"shape must be 1 to {MAX_DIMS} positive dimensions, got {shape}")
    nbytes = math.prod(image_shape)
    if nbytes > MAX_IMAGE_BYTES:
        raise InvalidImageError(f"shape {image_shape} is {nbytes} bytes an image; at most {MAX_IMAGE_BYTES}")
    if layout.encoded and len(image_shape) not in (2, 3):
        raise InvalidImageError(f"an encoded store holds [H, W] or [H, W, C] images, not shape {image_shape}")
    if not layout.encoded:
        cls.check_shape(image_shape)
    return image_shape


def _open_existing(
    path: Path,
    manifest: Manifest,
    backend: str | None,
    mode: Mode,
    reading: _Reading,
    options: Mapping[str, Any],
    layout: _Layout,
    lock: WriterLock | None = None,
) -> Store:
    from imgstore.registry import get_backend

    if manifest.creating:
        raise CorruptStoreError(
            f"{path} is being created, or its creation was interrupted; open it with mode 'w' to create it again"
        )
    if backend is not None and backend != manifest.backend:
        raise InvalidOptionError(f"{path} is a {manifest.backend!r} store, not {backend!r}")
    cls = get_backend(manifest.backend)
    layout.check_against(path, manifest)
    kept, overrides = resolve_options(cls.name, cls.option_specs, manifest.options, options)
    manifest = replace(_with_legacy_files(manifest, cls), options=kept)
    if manifest.shape is not None and not manifest.encoded:
        try:
            cls.check_shape(manifest.shape)
        except InvalidImageError as exc:
            raise CorruptStoreError(f"{path}: its manifest holds a shape its backend cannot hold: {exc}") from None
    try:
        store = cls(
            path,
            manifest,
            mode,
            sync=reading.sync,
            verify_reads=reading.verify_reads,
            overrides=overrides,
            decoder=reading.decoder,
        )
    except InvalidOptionError as exc:
        if "codec" in str(exc) and manifest.encoded:  # a codec this imgstore does not know
            raise CorruptStoreError(f"{path}: {exc}") from None
        raise
    store._lock = lock
    try:
        _refuse_links(store)
        store._load_checksums()
        store._open(create=False)
    except cls.damage_errors as exc:
        raise store._damaged(exc) from exc
    except OSError as exc:
        if isinstance(exc, ImgStoreError):
            raise
        raise CorruptStoreError(f"{path} cannot be opened: {exc}") from exc
    return store


def _refuse_links(store: Store) -> None:
    for name in store.files:
        depth = store.link_check_depths.get(name, store.link_check_depth)
        link = find_linked_folder(store.file(name), depth)
        if link is not None:
            raise CorruptStoreError(
                f"{link} is a symbolic link to a folder: imgstore never makes one in a store, and its backend's "
                "library would follow it out of the store; remove it (or open a copy of the store without it)"
            )


def _with_legacy_files(manifest: Manifest, cls: type[Store]) -> Manifest:
    if manifest.format_version >= 2:
        return manifest
    return replace(manifest, files=(*cls.files, *_LEGACY_STORE_FILES))


def _create(
    path: Path,
    cls: type[Store],
    old: Manifest | None,
    layout: _Layout,
    reading: _Reading,
    options: Mapping[str, Any],
    lock: WriterLock,
) -> Store:
    if layout.image_mode is not None and layout.codec == "raw":
        raise InvalidOptionError("image_mode applies to encoded stores (codec 'keep', 'png', 'jpeg', 'webp')")
    shape, sync = layout.shape, reading.sync
    store_files: tuple[str, ...] = _STORE_FILES
    if layout.encoded:
        from imgstore.encoded import ENCODED_FILES

        store_files = (*_STORE_FILES, *ENCODED_FILES)
    generation = secrets.token_hex(4)
    while old is not None and generation == old.generation:
        generation = secrets.token_hex(4)
    new = Manifest(
        backend=cls.name,
        shape=shape,
        options={name: spec.default for name, spec in cls.option_specs.items()}
        | check_options(cls.name, cls.option_specs, options),
        generation=generation,
        files=tuple(generation_name(name, generation) for name in (*cls.files, *store_files)),
        group=1 if layout.encoded else group_size(math.prod(shape)) if shape is not None else 0,
        codec=layout.codec,
        codec_params=layout.codec_params,
        image_mode=layout.image_mode,
        varied=layout.varied,
        classes=layout.classes,
        downscale=layout.downscale,
    )
    doing = f"creating a {cls.name} store at {path}"
    try:
        # The intent first: a manifest naming every file the old and the new store may leave behind.
        named = tuple(dict.fromkeys((*(old.files if old else ()), *new.files)))
        write_manifest(path, replace(new, files=named, creating=True), sync=sync)
        if old is not None:
            _delete_owned(path, old)
        store = cls(path, new, "w", sync=sync, verify_reads=reading.verify_reads, decoder=reading.decoder)
        store._lock = lock
        store._open(create=True)
    except OSError as exc:
        _delete_owned(path, new, quietly=True)  # give back what was made; the intent still names it
        if isinstance(exc, ImgStoreError):
            raise
        raise io_error(exc, doing) from exc
    except BaseException:
        _delete_owned(path, new, quietly=True)
        raise
    try:
        for name in store_files:
            store.file(name).touch()
        write_manifest(path, new, sync=sync)
    except OSError as exc:
        store.close()
        _delete_owned(path, new, quietly=True)
        raise io_error(exc, doing) from exc
    return store


def _as_path(path: Any) -> Path:
    try:
        store_path = Path(os.fsdecode(path) if isinstance(path, bytes) else path)
    except TypeError:
        raise InvalidOptionError(f"a store path is a str or os.PathLike, got {type(path).__name__}") from None
    if "\0" in str(store_path):
        raise InvalidOptionError(f"a store path cannot hold a NUL character: {str(store_path)!r}")
    # Absolute from the start: a handle keeps writing to the store it opened after a chdir (zarr
    # would make ./store anew in the new directory, TileDB resolves against its first directory).
    return Path(os.path.abspath(store_path))


def _make_directory(path: Path) -> None:
    try:
        _make_directory_at(path)
    except OSError as exc:
        if isinstance(exc, ImgStoreError):
            raise
        raise io_error(exc, f"opening {path}") from exc


def _make_directory_at(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise StoreExistsError(f"{path} is a symbolic link to nothing; not creating a store through it")
    if path.exists() and not path.is_dir():
        raise StoreExistsError(f"{path} is a file; a store is a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StoreExistsError(f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise io_error(exc, f"creating the directory {path}") from exc


def _existing_manifest(path: Path, mode: Mode) -> Manifest | None:
    """The manifest of the store a writer is about to open or replace; None for an empty directory.

    Refuses (:class:`StoreExistsError`) what is not a valid store, so that nothing is deleted.
    """
    from imgstore.registry import get_backend

    if not manifest_path(path).exists() and not manifest_path(path).is_symlink():
        foreign = sorted(entry.name for entry in path.iterdir() if not Manifest("", None).owns(entry.name))
        if foreign:
            raise StoreExistsError(
                f"{path} is a non-empty directory that is not an imgstore store (it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); not writing into it"
            )
        return None
    try:
        manifest = read_manifest(path)
    except ImgStoreError as exc:
        if mode == "a":
            raise
        raise StoreExistsError(
            f"{path / MANIFEST_NAME} is not a valid imgstore manifest ({exc}); not replacing what is there"
        ) from None
    if manifest.format_version < 2:
        try:
            manifest = _with_legacy_files(manifest, get_backend(manifest.backend))
        except ImgStoreError:
            if mode == "a":
                raise
            raise StoreExistsError(
                f"{path} is a store of backend {manifest.backend!r}, which is not installed: "
                "its files are unknown, so it is not replaced"
            ) from None
    return manifest


def _delete_owned(path: Path, manifest: Manifest, *, quietly: bool = False) -> None:
    """Delete the entries of ``path`` that ``manifest`` names as the store's (not the manifest or lock)."""
    try:
        entries = list(path.iterdir())
    except FileNotFoundError:
        if quietly:  # giving back after a failure: the store's folder itself was removed meanwhile
            return
        raise
    for entry in entries:
        if entry.name in (MANIFEST_NAME, WRITER_LOCK_NAME) or not manifest.owns(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            if not quietly:
                raise
