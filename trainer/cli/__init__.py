"""The ``trainer`` command line."""
