"""The FUSE adapter: operations on libfuse's high-level API (``operations.py``), the same
on the low-level API through pyfuse3 (``lowlevel.py``, ``LAYERSTORE_FUSE=pyfuse3``), the
mount daemon (``daemon.py``), the fuse-overlayfs-compatible entry point (``compat.py``),
and the choice of Python binding (``binding.py``: mfusepy on libfuse3, else fusepy on
libfuse2; pyfuse3 when asked for). Inside, the high-level binding is imported from
``binding`` as ``fusepy``; never create a top-level module named ``fuse`` (it would
shadow fusepy's)."""
