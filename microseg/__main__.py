"""`python -m microseg` is the `microseg` command."""

import sys

from .cli import main

sys.exit(main())
