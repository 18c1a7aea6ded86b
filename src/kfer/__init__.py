"""kfer: a reproducible pipeline for Korean facial-expression recognition."""

__version__ = "0.1.0"
