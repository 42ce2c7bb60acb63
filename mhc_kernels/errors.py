"""Exception types raised at the public boundary.

Every error says which argument or backend is at fault, what was expected and
what was given. The classes also derive from the matching builtin (``ValueError``,
``TypeError``, ``RuntimeError``) so ordinary ``except`` clauses keep working.
"""

from __future__ import annotations


class MHCError(Exception):
    """Base class of every error this package raises on purpose."""


class MHCInputError(MHCError, ValueError):
    """A tensor or scalar argument has the wrong shape, value or device."""


class MHCDtypeError(MHCInputError, TypeError):
    """A tensor argument has a dtype the operator (or the chosen backend) cannot take."""


class BackendError(MHCError, RuntimeError):
    """A forced backend cannot serve a call, or a backend name is unknown."""


class MHCUnsupportedError(MHCError, RuntimeError):
    """A use of autograd the ops do not support (double backward, forward-mode AD): refused, never a
    silently wrong number."""
