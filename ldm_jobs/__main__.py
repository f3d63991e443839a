"""`python -m ldm_jobs ...` is `ldm-jobs ...`."""

import sys

from ldm_jobs.jobs.cli import main

sys.exit(main())
