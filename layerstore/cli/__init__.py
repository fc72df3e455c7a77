"""The command line: argparse, one module per noun (``*_cmds.py``), errors printed once."""
