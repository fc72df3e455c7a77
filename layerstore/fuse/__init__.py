"""The FUSE adapter: operations (``operations.py``), the mount daemon (``daemon.py``),
the fuse-overlayfs-compatible entry point (``compat.py``), and the choice of Python
binding (``binding.py``: mfusepy on libfuse3, else fusepy on libfuse2). Inside, the
binding is imported from ``binding`` as ``fusepy``; never create a top-level module named
``fuse`` (it would shadow fusepy's)."""
