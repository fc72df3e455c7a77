"""Merged-view semantics of a container, without fusepy: lowers (``lower.py``) now; the
writable upper directory comes next. Testable without mounting."""
