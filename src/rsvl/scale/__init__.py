"""Scale-out: one task over many rasters (or the blocks of a large one) on Ray.

    from rsvl.scale import run
    run("segment", ["tiles/*.tif"], "out/county", classes="water, forest, buildings", workers=4)

See :func:`rsvl.scale.runner.run`; the task table is :data:`rsvl.scale.tasks.TASKS`, job
files are read by :func:`rsvl.scale.jobs.load_job`.
"""

from __future__ import annotations

from rsvl.scale.runner import RunResult, run

__all__ = ["RunResult", "run"]
