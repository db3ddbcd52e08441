"""`python -m microseg` is the `microseg` command."""

import sys

from microseg.control.cli import main

sys.exit(main())
