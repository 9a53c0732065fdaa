"""``python -m polyquant``: the command line (see ``polyquant.cli``)."""

from .cli import main

raise SystemExit(main())
