"""`python -m cfae <command>`: see cfae/cli.py."""

from cfae.cli import main

raise SystemExit(main())
