"""``get_logger`` as Datus-agent's ``datus/utils/loggings.py`` offers it, for installations
without Datus-agent (``datus-queue-standalone``): a standard-library logger, configured by
whoever configures logging in the process."""

from __future__ import annotations

import logging

__all__ = ["get_logger"]


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
