"""The one exception type the dataplane raises for conditions a user can cause and fix.

Its message is a complete one-line sentence; command-line entry points print it and exit instead of showing a
traceback.
"""


class DataplaneError(Exception):
    """A setup failure with a message fit for the user (not root, port in use, bad CIDR, ...)."""
