"""`python -m kt_edge_runtime` runs the device CLI."""

from .cli import main

raise SystemExit(main())
