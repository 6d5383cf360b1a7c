"""A minimal value-object base for protocol types.

``dataclasses`` would do this, but importing it (with ``inspect``, ``ast`` and ``dis``)
costs ~130 ms of every guest boot under TCG, and the guest imports the protocol at boot.
"""

from __future__ import annotations


class Record:
    """Equality, repr and dict conversion driven by the subclass's ``__slots__``."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def asdict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}
