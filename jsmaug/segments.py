"""Segment ids, the one contract between packed rows (jsmaug/data/packing.py) and the attention mask
(jsmaug/models/attention.py): 0 is padding; ids 1 .. SHARED - 1 are ordinary segments, each attending only to
itself; a pair laid out with its prompt shared (`data.share_prompt`) carries `shared_id(u, b)`: its unit u in the
row, b = PROMPT for the prompt, CHOSEN / REJECTED for the branches, each branch also attending to its unit's
prompt (`attention.visible`)."""

SHARED = 1 << 24
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_id(unit: int, branch: int) -> int:
    return SHARED + 4 * unit + branch
