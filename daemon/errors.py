"""Errors a user can cause and fix; flanneld prints the message on one line and exits with the status given."""


class FlannelError(Exception):
    """A fatal setup problem; `status` is the exit code (1 unless said otherwise)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(FlannelError):
    """The network config is missing or invalid (flannel's CheckNetworkConfig texts where they are clear)."""
