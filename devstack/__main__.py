"""`python3 -m devstack {install,up,down,status,env,reset,guest,test,demo,bench,chaos,host,smoke}`."""

import sys

from devstack.cli import main

sys.exit(main())
