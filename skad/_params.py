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

Renamed parameters keep their old names for one release, as scikit-learn
deprecates them: the old name stays a constructor keyword whose default,
``"deprecated"``, means "not set"; a detector lists its renames in
``_deprecated_parameters`` (old name -> new name, or -> ``(new name, convert)``
where the value changes form) and declares the old name's constraints with
:func:`deprecated`. :func:`warn_renamed` (at validation) warns with a
``FutureWarning`` for each old name set, :func:`renamed_value` (where the
detector reads the parameter) gives the old name's value when it is set, and
:func:`upgrade_state` (on unpickling) moves attributes pickled under an old
name to the new one.
"""

import inspect
import warnings
from numbers import Integral, Real

import torch
from sklearn.utils._param_validation import Hidden, Interval, Options, StrOptions, make_constraint

__all__ = ["DEPRECATED", "Devices", "Ints", "Reals", "Sequences", "deprecated", "is_set",
           "renamed_target", "renamed_value", "upgrade_state", "warn_renamed"]

#: the default of a renamed parameter's old name: not set
DEPRECATED = "deprecated"
#: the release that renamed the parameters, and the one that drops their old names
RENAMED_IN, REMOVED_IN = "0.2", "0.3"


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


# ---------------------------------------------------------------- renamed parameters
def deprecated(*constraints):
    """The constraints of a renamed parameter's old name: unset, or a value it took."""
    return [*constraints, Hidden(StrOptions({DEPRECATED}))]


def is_set(value):
    """Whether a deprecated parameter's ``value`` was set (not its ``DEPRECATED`` default)."""
    return not (isinstance(value, str) and value == DEPRECATED)


def renamed_target(spec):
    """``(new name, convert or None)`` of an entry of ``_deprecated_parameters``."""
    return (spec, None) if isinstance(spec, str) else spec


def _converted(spec, value):
    convert = renamed_target(spec)[1]
    return convert(value) if convert is not None else value


def _same(a, b):
    # the command line's JSON values are lists where the defaults are tuples
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays and other values without one truth value
        return False


def renamed_value(estimator, name):
    """Parameter ``name`` of ``estimator``: its deprecated old name's value where that is set."""
    for old, spec in estimator._deprecated_parameters.items():
        if renamed_target(spec)[0] == name and is_set(getattr(estimator, old, DEPRECATED)):
            return _converted(spec, getattr(estimator, old))
    return getattr(estimator, name)


def warn_renamed(estimator):
    """A ``FutureWarning`` for each deprecated old name that is set.

    Raises ``ValueError`` when the new name is set too (to other than its
    default): which of the two was meant cannot be told.
    """
    cls = type(estimator).__name__
    defaults = inspect.signature(type(estimator).__init__).parameters
    for old, spec in estimator._deprecated_parameters.items():
        value = getattr(estimator, old, DEPRECATED)
        if not is_set(value):
            continue
        new = renamed_target(spec)[0]
        if not _same(getattr(estimator, new), defaults[new].default):
            raise ValueError(
                f"{cls} got both {old}={value!r} and {new}={getattr(estimator, new)!r}; "
                f"{old} is the old name of {new}: set {new} only")
        warnings.warn(
            f"{cls}'s parameter {old!r} was renamed {new!r} in {RENAMED_IN} and will be "
            f"removed in {REMOVED_IN}: use {new}={_converted(spec, value)!r}",
            FutureWarning, stacklevel=4)


def upgrade_state(state, renames):
    """``state`` of a pickle, with attributes pickled under an old name moved to the new one."""
    state = dict(state)
    for old, spec in renames.items():
        new = renamed_target(spec)[0]
        if new not in state and old in state:
            state[new] = _converted(spec, state.pop(old))
            state[old] = DEPRECATED
    return state
