"""Shim for ``python kotara.py ...``: all logic lives in the ``kotara`` package (``kotara.cli``)."""

from kotara.cli import main

raise SystemExit(main())
