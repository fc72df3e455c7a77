"""The FUSE adapter: fusepy operations (``operations.py``) and the mount daemon
(``daemon.py``). Inside, ``import fuse as fusepy`` names fusepy's module; never create a
top-level module named ``fuse``."""
