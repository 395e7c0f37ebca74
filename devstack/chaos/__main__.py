"""`python3 -m devstack.chaos ...` (what `python3 -m devstack chaos ...` runs)."""

import sys

from devstack.chaos.run import main

sys.exit(main())
