"""layerstore: a content-addressed store for container image layers, and a FUSE view.

General layout (imports go one way: cli -> fuse -> overlay -> store -> digest/errors;
oci -> store)::

    errors.py     the one exception hierarchy (exit codes, errno)
    digest.py     blake3 Digest, sha256 helpers for OCI
    store/        LMDB: environment, records, chunks, layers, images, gc, check
    oci/          import (OCI layout, docker save, layer tars, directories) and export
    overlay/      merged-view semantics, no fusepy
    fuse/         the FUSE adapter only
    cli/          the command line, one module per noun
"""

from .errors import LayerstoreError
from .store import Store

__version__ = "0.1.0"
__all__ = ["LayerstoreError", "Store", "__version__"]
