"""Token groups: the ids the op, the patch, the metrics and the reports share.

Every key belongs to one group; the op's bias and logit-scale tables have one column per group and its masses
one entry per group. Masked keys (padding) are −1: they get no attention and no column.
"""

from __future__ import annotations

import enum

__all__ = ["Group", "NUM_GROUPS", "GROUP_NAMES"]


class Group(enum.IntEnum):
    MASKED = -1  # padding / keys no query may see
    OTHER = 0  # text outside the system prompt and the user turns (template tokens, assistant turns)
    VISUAL = 1  # image and video tokens
    SYSTEM = 2  # the system prompt
    USER = 3  # the text of user turns


NUM_GROUPS = 4  # groups with a column in the tables and the masses: OTHER, VISUAL, SYSTEM, USER

GROUP_NAMES = tuple(g.name.lower() for g in Group if g >= 0)  # ("other", "visual", "system", "user"), by id
