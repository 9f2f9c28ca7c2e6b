"""The one exception type for errors a user can cause (bad paths, files, configs, caches)."""
from __future__ import annotations


class LadError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero.

    ``message`` says what is wrong and names the thing at fault (file, key, view); it is what ``str()`` gives, so
    a caller of the library reads no command-line advice. ``hint``, where there is one, says what to do in the
    terms of the command line (a flag, a command); the CLI prints it after the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep the hint when the error crosses a process boundary (DataLoader workers)
        return type(self), (self.message, self.hint)

    def for_user(self) -> str:
        """The line the command line prints: the message, then what to do."""
        return f"{self.message}; {self.hint}" if self.hint else self.message
