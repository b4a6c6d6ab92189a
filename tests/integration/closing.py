"""A base for the test helpers that own processes or connections: leaving ``with`` closes them."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with helper:`` calls ``helper.close()`` on the way out, whatever happened inside."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
