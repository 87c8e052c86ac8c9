"""`python -m ckptd` is the same as the `ckptd` console script."""

from ckptd.cli import main

raise SystemExit(main())
