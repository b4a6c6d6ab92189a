"""Dead-letterings counted per reason: the ``dead:<reason>`` fields of a queue's ``stats`` hash.

The counters themselves are :class:`celery_msg.keys.Counter` (the scripts get them as
``STAT_<NAME>``). A dead-lettering is counted twice in the same script call: in ``dead`` and
in ``dead:<reason>``. The reason comes from the caller, so it is checked to be a short word
first (here, and again in Lua before the script's first write): a free text must not make
counters, and metrics label values, without bound.
"""

from __future__ import annotations

import re

#: The prefix of the fields that count dead-letterings per reason: ``dead:poison``, ...
DEAD_REASON_PREFIX = "dead:"
#: Longest reason word that names a counter (the scripts get it in their preamble).
REASON_MAX = 40
#: What a reason that is no word (a free text from a caller) is counted as.
OTHER_REASON = "other"
_WORD = re.compile(rf"[a-z][a-z0-9_-]{{0,{REASON_MAX - 1}}}")


def reason_word(reason: str) -> str:
    """``reason`` if it can name a counter and a metrics label (a short lower-case word, as
    every reason celery-msg writes: ``failed``, ``poison``, ``undecodable``, ...), else
    ``other``."""
    return reason if _WORD.fullmatch(reason) else OTHER_REASON
