"""`python -m jobs ...` is `ldm-jobs ...`."""

import sys

from jobs.cli import main

sys.exit(main())
