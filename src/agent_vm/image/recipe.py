"""Image recipes: a small TOML file that extends the base image (like a Dockerfile, but
declarative), and the key that says when a layer built from it is still current.

The key hashes everything that can change the layer: the base image's key, the recipe's
parsed content and the bytes of every file it copies in. Unpinned packages (``aider-chat``
rather than ``aider-chat==0.86.2``) are not part of the key beyond their spelling: pin
them for reproducible layers, or rebuild with ``--force``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent_vm.errors import ConfigError
from agent_vm.network.policy import EgressPolicy

LAYER_VERSION = "1"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# characters a package spec may hold (name, extras, version constraints, npm scopes/tags)
PACKAGE_SPEC = re.compile(r"^[A-Za-z0-9@][A-Za-z0-9@/._+~<>=!,\[\]:^*-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _packages(values: list[str]) -> list[str]:
    for value in values:
        if not PACKAGE_SPEC.match(value):
            raise ValueError(f"not a package name or spec: {value!r}")
    return values


class AptSection(_Strict):
    packages: list[str] = []

    _check = field_validator("packages")(_packages)


class PipSection(_Strict):
    packages: list[str] = []
    venv: str | None = Field(
        default=None, description="install into a venv at this path (else the system Python)"
    )

    _check = field_validator("packages")(_packages)


class NpmSection(_Strict):
    packages: list[str] = []

    _check = field_validator("packages")(_packages)


class KernelSection(_Strict):
    """Modules of the guest's own kernel. A recipe's apt sees the distribution's newest
    kernel package, which need not be the one the guest boots; these come from the
    package the image's kernel was taken from, so they always match it."""

    modules: list[str] = Field(
        default=[], description="installed with their dependencies and loaded at boot"
    )
    all_modules: bool = Field(
        default=False,
        description="install the kernel's whole /lib/modules tree (~400 MB), so modprobe "
        "and the kernel's on-demand loading work (a VM that runs VMs or firewalls)",
    )

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"not a kernel module name: {name!r}")
        return value


class FileCopy(_Strict):
    source: str = Field(description="a file next to the recipe (a relative path)")
    dest: str = Field(description="absolute path in the image")
    mode: str = "0644"

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3,4}", value):
            raise ValueError(f"mode must be octal like '0644', not {value!r}")
        return value


class AgentSection(_Strict):
    """How ``agent-vm agent NAME`` runs the program this image exists for."""

    command: list[str] = Field(min_length=1)
    headless: list[str] = Field(
        default=[], description="arguments added when no terminal is attached"
    )
    api_key_env: str | None = None
    base_url_env: str | None = Field(
        default=None, description="the environment variable that sets the model API's URL"
    )
    base_url_args: list[str] = Field(
        default=[], description="arguments that set the URL instead; {url} is replaced"
    )


class Recipe(_Strict):
    name: str
    description: str = ""
    apt: AptSection = AptSection()
    pip: PipSection = PipSection()
    npm: NpmSection = NpmSection()
    kernel: KernelSection = KernelSection()
    files: list[FileCopy] = []
    run: list[str] = Field(default=[], description="shell commands run at build time, as root")
    env: dict[str, str] = {}
    user: Literal["root", "agent"] = "root"
    workdir: str | None = None
    allowlist: list[str] = Field(
        default=[], description="the names the image's sandboxes may reach (empty: no limit)"
    )
    agent: AgentSection | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("lower-case letters, digits, '.', '_' and '-' only")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not ENV_NAME.match(key) or "\0" in item:
                raise ValueError(f"invalid environment variable {key!r}")
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is not None and not PurePosixPath(value).is_absolute():
            raise ValueError("workdir must be an absolute path")
        return value

    @field_validator("allowlist")
    @classmethod
    def _allowlist(cls, value: list[str]) -> list[str]:
        EgressPolicy(allow_domains=tuple(value))  # the same rules a policy applies
        return value

    def apt_packages(self) -> list[str]:
        """What apt installs: the recipe's packages plus what its other steps need."""
        wanted = list(self.apt.packages)
        if self.pip.packages:
            wanted += ["python3-venv"] if self.pip.venv else ["python3-pip"]
        if self.npm.packages:
            wanted += ["nodejs", "npm"]
        return sorted(set(wanted))


class LoadedRecipe(BaseModel):
    """A recipe with where it came from and the files it copies, read once."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    path: Path
    file_digests: dict[str, str]

    def key(self, base_key: str) -> str:
        digest = hashlib.sha256()
        for part in (
            LAYER_VERSION,
            base_key,
            self.recipe.model_dump_json(),
            *(f"{k}={v}" for k, v in sorted(self.file_digests.items())),
        ):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]

    def source(self, copy: FileCopy) -> Path:
        return (self.path.parent / copy.source).resolve()


def load_recipe(path: str | os.PathLike[str]) -> LoadedRecipe:
    """Parse and check a recipe; ConfigError with one line saying what is wrong."""
    recipe_path = Path(path).resolve()
    try:
        data = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no recipe at {path}", hint="give the path of a .toml file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the recipe {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "recipe"
        raise ConfigError(
            f"{path}: {where}: {first['msg']}",
            hint="see docs/recipes.md for the fields a recipe may have",
        ) from None
    digests = {}
    for copy in recipe.files:
        source = (recipe_path.parent / copy.source).resolve()
        if not PurePosixPath(copy.dest).is_absolute():
            raise ConfigError(f"{path}: files: dest {copy.dest!r} must be an absolute path")
        try:
            digests[copy.source] = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError as exc:
            raise ConfigError(
                f"{path}: files: cannot read {copy.source} ({exc.strerror})",
                hint="paths are relative to the recipe file",
            ) from None
    return LoadedRecipe(recipe=recipe, path=recipe_path, file_digests=digests)


SHIPPED = ("claude", "aider", "codex")


def shipped_recipe(name: str) -> Path:
    """The path of a recipe that comes with agent-vm (``claude``, ``aider``, ``codex``)."""
    from importlib import resources

    return Path(str(resources.files("agent_vm").joinpath("recipes", f"{name}.toml")))


def find_recipe(name_or_path: str) -> LoadedRecipe:
    """A shipped recipe by name, or a recipe file by path."""
    if name_or_path in SHIPPED:
        return load_recipe(shipped_recipe(name_or_path))
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_recipe(name_or_path)
    raise ConfigError(
        f"no agent called {name_or_path!r}",
        hint=f"one of {', '.join(SHIPPED)}, or the path of a recipe with an [agent] table",
    )
