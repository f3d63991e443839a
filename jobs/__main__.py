"""`python -m ldm_jobs.jobs ...` (and `python -m jobs ...` from a source checkout) is
`ldm-jobs ...`."""

import sys

from ldm_jobs.jobs.cli import main

sys.exit(main())
