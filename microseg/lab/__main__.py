"""`python -m microseg.lab up|down`: a lab to point a daemon at by hand."""

import sys

from microseg.lab.topology import main

sys.exit(main())
