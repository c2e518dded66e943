"""Execution backends (installed as ``marcache.backends``)."""
