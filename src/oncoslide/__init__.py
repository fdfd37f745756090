"""oncoslide: whole-slide images and patient tables to validated survival and molecular predictions."""

from oncoslide._threads import prefer_short_waits

# before anything loads torch: OpenMP threads that spin long while they wait collapse training
# on a shared machine (oncoslide._threads, docs/training.md); a wait policy the user set wins
prefer_short_waits()

__version__ = "0.1.0"
