"""``python -m layerstore``: the command line."""

from .cli.main import main

raise SystemExit(main())
