"""Pydantic models that fail like the rest of agent-vm: with a ConfigError, in one line.

pydantic's own ``ValidationError`` is not an :class:`~agent_vm.errors.AgentVMError`, its
text spans several lines and ends in a URL; a user who passed ``vcpu=0`` should read
``ResourceProfile: vcpu: must be at least 1`` and be able to catch it with the rest.
The conversion sits in the metaclass's ``__call__`` so that the models keep the typed
``__init__`` that pydantic's mypy plugin derives from their fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic._internal._model_construction import ModelMetaclass

from agent_vm.errors import ConfigError


def describe(exc: ValidationError, what: str, field_name: Callable[[str], str] = str) -> str:
    """One line naming every invalid field (as ``field_name`` spells it) and why."""
    problems = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or "value"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{field_name(location)}: {message}")
    return f"{what}: " + "; ".join(problems)


class _RaisesConfigError(ModelMetaclass):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(describe(exc, cls.__name__)) from None


class Model(BaseModel, metaclass=_RaisesConfigError):
    """Base for models users construct: invalid input raises ConfigError."""
