"""The one exception hierarchy of layerstore.

Two branches:

- ``LayerstoreError`` and its store/input subclasses: each carries ``exit_code``, the
  command line's exit status, and ``str(e)`` is the one line the CLI prints.
- ``OverlayError``: also an ``OSError`` with a real errno, raised by ``layerstore.overlay``
  so the FUSE adapter can pass it to the kernel unchanged.

Imports nothing from the rest of the package.
"""

from __future__ import annotations

import errno
import os


class LayerstoreError(Exception):
    """Something went wrong; the message says what, in one line."""

    exit_code = 1


# --- user input -------------------------------------------------------------------------


class UsageError(LayerstoreError):
    """The command line asked for something that cannot be done as asked."""

    exit_code = 2


class InvalidInputError(LayerstoreError):
    """An input file or directory is not something layerstore can import."""

    exit_code = 3


class InvalidLayerError(InvalidInputError):
    """A layer tar is malformed, truncated or unsafe (``..``, escaping links, ...)."""


class DigestMismatchError(InvalidInputError):
    """A blob or an uncompressed layer does not hash to the digest that names it."""


class BlobNotFoundError(InvalidInputError):
    """A manifest, index or config names a blob that the input does not contain."""


class PlatformNotFoundError(InvalidInputError):
    """No manifest in an image index matches the requested platform."""


# --- the store --------------------------------------------------------------------------


class StoreError(LayerstoreError):
    """The store cannot do what was asked."""

    exit_code = 4


class StoreAccessError(StoreError):
    """The store root cannot be created, opened or written."""


class NotFoundError(StoreError):
    """Something named does not exist in the store."""

    exit_code = 5


class ImageNotFoundError(NotFoundError):
    """No image has that name, tag or id."""


class LayerNotFoundError(NotFoundError):
    """No layer has that id."""


class ContainerNotFoundError(NotFoundError):
    """No container has that name or id."""


class AmbiguousNameError(StoreError):
    """A short id prefix matches more than one object."""


class DuplicateNameError(StoreError):
    """A name is already taken (by another container, for example)."""


class InUseError(StoreError):
    """An image is used by a container, or a layer by an image."""

    exit_code = 6


class ChangingFileError(StoreError):
    """A file changed under a reader that needs it whole (``commit`` of a running
    container)."""


class LockedError(StoreError):
    """Another process holds a lock that this operation needs (import vs gc)."""

    exit_code = 7


class IntegrityError(StoreError):
    """The store is damaged: a chunk, file, entry or record is missing or corrupt."""

    exit_code = 90


class SchemaError(StoreError):
    """The store was written by an incompatible version of layerstore."""


class MountError(LayerstoreError):
    """A mount could not be made or removed (FUSE missing, daemon failed, busy)."""

    exit_code = 8


# --- the overlay view -------------------------------------------------------------------


class OverlayError(LayerstoreError, OSError):
    """An overlay operation failed with a real errno (passed to FUSE as is)."""

    exit_code = 1

    def __init__(self, err: int, path: str | bytes | None = None) -> None:
        if path is None:
            OSError.__init__(self, err, os.strerror(err))
        else:
            OSError.__init__(self, err, os.strerror(err), path)

    def __str__(self) -> str:
        return OSError.__str__(self)


class NoEntryError(OverlayError, FileNotFoundError):
    def __init__(self, path: str | bytes | None = None) -> None:
        super().__init__(errno.ENOENT, path)


class OtherFileError(NoEntryError):
    """The path names another object than the one the caller means (its ``st_ino``):
    a rename or an unlink changed the name since the caller made the path. Nothing was
    done; ENOENT if it gets to the kernel (the object it meant has no name there now)."""


class NoXattrError(OverlayError):
    """ENODATA from a getxattr; ``names``: the attribute names the entry has (what
    ``listxattr`` gives), so that a caller keeping them needs no second lookup."""

    def __init__(self, path: str | bytes | None, names: list[bytes]) -> None:
        super().__init__(errno.ENODATA, path)
        self.names = names


class NotEmptyError(OverlayError):
    def __init__(self, path: str | bytes | None = None) -> None:
        super().__init__(errno.ENOTEMPTY, path)


class ReadOnlyError(OverlayError):
    def __init__(self, path: str | bytes | None = None) -> None:
        super().__init__(errno.EROFS, path)
