"""The one exception type for errors a user can cause (bad paths, files, configs, caches)."""


class LadError(Exception):
    """A problem the user can fix. The CLI prints its message as one line and exits non-zero.

    Messages name the thing at fault and, where it helps, what to do about it.
    """
