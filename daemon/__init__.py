"""The corespond process and its core: config, logging, clock, store, pipeline, CLI."""

__version__ = "0.1.0"
