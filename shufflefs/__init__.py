"""shufflefs: Spark's local directory on FUSE, committed shuffle files written through to a store."""

__version__ = "0.1.0"
