"""oncoslide: whole-slide images and patient tables to validated survival and molecular predictions."""

__version__ = "0.1.0"
