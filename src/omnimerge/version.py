"""omnimerge's version (what report.json records)."""

__version__ = "0.1.0"
