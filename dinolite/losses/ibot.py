"""Placeholder: being written."""


class IBOTPatchLoss:  # noqa: placeholder
    pass
