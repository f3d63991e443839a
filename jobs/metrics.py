"""What a cluster operator watches while a job runs, as Ray metrics.

Recorded by the driver (it sees every shard's result and the queue), exported by Ray's
metrics agent on the driver's node in Prometheus form (`/metrics` on the node's
metrics-export port, scraped for the dashboard's Metrics view) with Ray's `ray_` prefix:
`ray_ldm_jobs_images_generated`, `ray_ldm_jobs_rows_rejected`, `ray_ldm_jobs_shard_seconds`
(a histogram of shard busy time) and `ray_ldm_jobs_shards_queued`, each tagged with the
job's name. Only runs through Ray have them; a job run in-process has its manifest.
"""

from __future__ import annotations

from typing import Any

# Shard busy seconds: from a small CPU shard to a long GPU one.
SHARD_SECONDS_BOUNDARIES = [1, 5, 15, 60, 180, 600, 1800]


class JobMetrics:
    def __init__(self, job: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        keys, tags = ("job",), {"job": job}
        self.images = Counter("ldm_jobs_images_generated",
                              "Images generated and committed", tag_keys=keys)
        self.rejected = Counter("ldm_jobs_rows_rejected",
                                "Input rows rejected with a reason", tag_keys=keys)
        self.seconds = Histogram("ldm_jobs_shard_seconds", "Busy seconds of each shard",
                                 boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=keys)
        self.queued = Gauge("ldm_jobs_shards_queued", "Shards waiting for an actor",
                            tag_keys=keys)
        for metric in (self.images, self.rejected, self.seconds, self.queued):
            metric.set_default_tags(tags)

    def shard_done(self, result: Any) -> None:
        if result.generated:  # a Counter takes only positive steps
            self.images.inc(result.generated)
        if result.rejected:
            self.rejected.inc(result.rejected)
        self.seconds.observe(result.busy_seconds)

    def queue(self, shards: int) -> None:
        self.queued.set(shards)
