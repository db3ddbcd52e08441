"""`python -m microseg` is the `microseg` command."""

import sys

from microseg.cli import main

sys.exit(main())
