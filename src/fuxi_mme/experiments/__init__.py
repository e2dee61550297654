"""Experiment suites: grids of (dataset, variant, seed) runs, resumable, run concurrently,
aggregated over seeds into results JSON, Markdown tables and the results page.

``suites/*.yaml`` (the suites, as data) -> :mod:`.suites` (reading them) -> :mod:`.plan` (the
job list and each job's config) -> :mod:`.runner` (subprocesses) -> :mod:`.logs` (per-epoch
logs packed per suite) -> :mod:`.aggregate` (mean and std over seeds) -> :mod:`.stats` (Welch's
test) -> :mod:`.tables`, :mod:`.plots`, :mod:`.page` (Markdown, plots, docs/results.md).
:mod:`.report` draws one or more runs' curves and table (``fuxi-mme report``); :mod:`.own` holds a
user's own files in the suites (``experiment --source``).
"""

from .aggregate import aggregate
from .page import DOC_ORDER, write_docs
from .plan import Job, config_changes, job_cost, plan
from .runner import run_suite, run_suites
from .suites import SUITES, Suite, Variant, load_suite
from .tables import markdown

__all__ = [
    "DOC_ORDER",
    "SUITES",
    "Job",
    "Suite",
    "Variant",
    "aggregate",
    "config_changes",
    "job_cost",
    "load_suite",
    "markdown",
    "plan",
    "run_suite",
    "run_suites",
    "write_docs",
]
