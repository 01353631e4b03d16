"""A tiny name → implementation registry shared by every extension axis."""

import inspect
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from wdmoe.errors import ConfigError, UnknownNameError, WdmoeError

T = TypeVar("T")
P = TypeVar("P")
F = TypeVar("F")


class Registry(Generic[T]):
    """Maps registered names to items of type T; ``get`` raises a clear error for unknown names.

    ``register`` is a decorator that hands its argument back unchanged (a registered class keeps
    its own type in its module); what ``get`` returns is typed T.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(item: F) -> F:
            assert name not in self._items, f"{self.kind} {name!r} registered twice"
            self._items[name] = cast(T, item)
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


class Factories(Registry[Callable[..., P]]):
    """A registry of factories (classes) of P, built by name from checked keyword parameters."""

    def make(self, name: str, params: Mapping[str, object], hidden: Collection[str] = ()) -> P:
        """Build ``name`` with keyword ``params``; a wrong name or type raises ConfigError.

        Values reach us from the command line and TOML files, so a typo or a string where a
        number belongs must be refused here, naming the parameter, rather than surface later as a
        TypeError deep inside the implementation (or, worse, be accepted). ``hidden`` parameters
        are accepted but not advertised in the message (internal state, the display name).
        """
        factory = self.get(name)
        check_params(f"{self.kind} {name!r}", parameter_types(factory), params, hidden)
        try:
            return factory(**params)
        except WdmoeError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.kind} {name!r} with {dict(params)}: {e}") from e


def parameter_types(factory: Callable[..., object]) -> dict[str, object] | None:
    """The keyword parameters of ``factory`` and their annotations (Any when unannotated);
    None when it takes ``**kwargs`` (then any name is allowed)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    try:  # a dataclass's fields carry the annotations of its __init__
        hints = get_type_hints(factory)
    except (NameError, TypeError):  # an annotation that does not resolve: check names only
        hints = {}
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: hints.get(p.name, Any) for p in params if p.kind in keyword}


def check_params(
    what: str,
    accepted: Mapping[str, object] | None,
    params: Mapping[str, object],
    hidden: Collection[str] = (),
) -> None:
    """Raise ConfigError for a parameter ``what`` does not take or a value of the wrong type."""
    if accepted is None:
        return
    listing = ", ".join(f"{k}: {type_name(t)}" for k, t in accepted.items() if k not in hidden) or "none"
    for key, value in params.items():
        if key not in accepted:
            raise ConfigError(f"{what} does not take {key}={value!r}; its parameters: {listing}")
        if not matches(value, accepted[key]):
            raise ConfigError(
                f"{what}: {key}={value!r} must be {type_name(accepted[key])}, "
                f"not {type(value).__name__}; its parameters: {listing}"
            )


def matches(value: object, hint: object) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (an int fits float; a bool fits only bool)."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint is None or hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, int | float if hint is float else int) and not isinstance(value, bool)
    target = origin or hint
    try:
        return isinstance(value, target) if isinstance(target, type) else True
    except TypeError:  # an annotation isinstance cannot check (a TypeVar, a Protocol)
        return True  # let the factory decide


def type_name(hint: object) -> str:
    """``float``, ``int | None``, ``SloState | None``: the annotation as a user reads it."""
    if inspect.isclass(hint) and get_origin(hint) is None:
        return "None" if hint is type(None) else hint.__name__
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in get_args(hint))
    return str(hint).replace("typing.", "")
