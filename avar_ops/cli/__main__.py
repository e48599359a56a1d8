"""`python -m avar_ops.cli` runs the `avar` command."""

import sys

from avar_ops.cli import main

sys.exit(main())
