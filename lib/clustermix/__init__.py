"""clustermix: embed, cluster and balance a text corpus into a training mix written as Delta tables."""

__version__ = "0.1.0"
