"""Parameter constraints that scikit-learn's ``_param_validation`` lacks, in its terms.

Detectors declare the type and range of every constructor parameter in a
``_parameter_constraints`` dict, as scikit-learn's estimators do (see
:mod:`skad.base`). scikit-learn has no constraint for a tuple of values nor for
a torch device, and its ``Interval(Integral, ...)`` takes ``True`` for 1; the
classes here fill those gaps. They subclass scikit-learn's own constraint
classes because ``validate_parameter_constraints`` accepts no others, so that
a bad value gets scikit-learn's message, which names the parameter and what it
accepts::

    The 'batch_size' parameter of PatchCore must be an int in the range [1, inf).
    Got 0 instead.
"""

from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Interval, Options, make_constraint

__all__ = ["Devices", "Ints", "Reals", "Sequences"]


def _closed(left, right):
    """The ``closed`` of an interval that includes each bound it has."""
    return {(True, True): "both", (True, False): "left",
            (False, True): "right", (False, False): "neither"}[left is not None, right is not None]


class Ints(Interval):
    """Integers from ``left`` to ``right`` (None: unbounded), booleans excluded.

    The bounds are included unless ``closed`` says otherwise (as for
    :class:`~sklearn.utils._param_validation.Interval`). ``top_k=True`` is a
    mistake, not 1.
    """

    def __init__(self, left=None, right=None, *, closed=None):
        super().__init__(Integral, left, right, closed=closed or _closed(left, right))

    def is_satisfied_by(self, val):
        return not isinstance(val, bool) and super().is_satisfied_by(val)

    def __str__(self):
        return "an int" if self.left is None and self.right is None else super().__str__()


class Reals(Interval):
    """Real numbers (ints included) from ``left`` to ``right``, booleans excluded.

    The bounds are included unless ``closed`` says otherwise.
    """

    def __init__(self, left=None, right=None, *, closed=None):
        super().__init__(Real, left, right, closed=closed or _closed(left, right))

    def is_satisfied_by(self, val):
        return not isinstance(val, bool) and super().is_satisfied_by(val)


class Sequences(Options):
    """A tuple or list whose items each satisfy one of ``constraints``.

    ``length``: exactly that many items; otherwise at least ``min_length``.
    Lists count as well as tuples: the command line's JSON values are lists.
    """

    def __init__(self, *constraints, length=None, min_length=1):
        super().__init__(type=(tuple, list), options=set())
        self.items = [make_constraint(c) for c in constraints]
        self.length = length
        self.min_length = min_length

    def is_satisfied_by(self, val):
        if not isinstance(val, (tuple, list)):
            return False
        if len(val) != self.length if self.length is not None else len(val) < self.min_length:
            return False
        return all(any(c.is_satisfied_by(v) for c in self.items) for v in val)

    def __str__(self):
        if self.length is not None:
            count = str(self.length)
        else:
            count = {0: "any number of", 1: "one or more"}.get(self.min_length,
                                                               f"{self.min_length} or more")
        return f"a tuple of {count} items, each {' or '.join(map(str, self.items))}"


class Devices(Options):
    """``"auto"``, a device string that ``torch.device`` reads, or a ``torch.device``.

    Only the spelling is checked: whether CUDA is there is asked at each call
    (:func:`skad.base.resolve_device`), as a detector may move between machines.
    """

    def __init__(self):
        super().__init__(type=(str, torch.device), options=set())

    def is_satisfied_by(self, val):
        if isinstance(val, torch.device) or (isinstance(val, str) and val == "auto"):
            return True
        if not isinstance(val, str):
            return False
        try:
            torch.device(val)
        except (RuntimeError, ValueError):
            return False
        return True

    def __str__(self):
        return "'auto', a torch device string ('cpu', 'cuda', 'cuda:1', ...) or a torch.device"
