"""The pack's own error type, base of every error it raises about files and settings.

Hosts print an exception's type by its module path, and ComfyUI names a custom node package by
its install path; the module is therefore fixed to ``selfforcing`` so an error reads
``selfforcing.CheckpointError`` instead of revealing the server's folders.
"""


class SelfForcingError(ValueError):
    """A file or setting the pack cannot use; the message names it and the fix."""

    __module__ = "selfforcing"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "selfforcing"
