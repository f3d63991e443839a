"""`ldm-jobs show OUT --html DIR`: a static gallery of a job's output.

The site opens from disk with no server: browsers refuse `fetch()` of `file://` URLs, so
every piece of data is either inline in `index.html` or a `<script src>` file that hands
its JSON to the page. Modules, one idea each:

- `source.py`  the output's shards, records and rejected rows, read shard by shard
- `thumbs.py`  thumbnails (and the full images) made and written by a pool of threads
- `index.py`   per-shard metadata caches -> per-page-group index files, facet counts
- `plots.py`   the job's story as inline SVG (throughput per worker, shard durations,
               rows by outcome)
- `site.py`    the destination (local or s3://), the page and its assets, incremental runs
"""

from .site import GalleryError, GalleryResult, write_gallery

__all__ = ["GalleryError", "GalleryResult", "write_gallery"]
