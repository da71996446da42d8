"""The ``mailworker`` command line."""
