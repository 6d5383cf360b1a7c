"""What ``agent-vm agent NAME`` runs: the recipe's command, its key, its API's names.

Pure logic (tested without a VM): the recipe's ``[agent]`` table, the user's arguments,
the host's environment and an optional base URL become a command line, an environment,
the secrets (the API key, never in the command line) and the allowlist.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from agent_vm.errors import ConfigError
from agent_vm.image.recipe import LoadedRecipe
from agent_vm.secrets import Secret


@dataclass(frozen=True)
class AgentPlan:
    command: list[str]
    env: dict[str, str]
    secrets: dict[str, str | Secret]  # the key: injected by the host's proxy over HTTPS
    allowlist: tuple[str, ...]


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--base-url {url!r} is not an http(s) URL")
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return parts.hostname
    raise ConfigError(
        f"--base-url {url!r} names an address, not a host",
        hint="the allowlist works on names: give the API's host name",
    )


def agent_plan(
    loaded: LoadedRecipe,
    args: list[str],
    base_url: str | None,
    environ: Mapping[str, str],
    *,
    tty: bool,
) -> AgentPlan:
    recipe = loaded.recipe
    spec = recipe.agent
    if spec is None:
        raise ConfigError(
            f"the recipe {loaded.path} has no [agent] table",
            hint="add one with command = [...] to run it with `agent-vm agent`",
        )
    hidden: dict[str, str | Secret] = {}
    env: dict[str, str] = {}
    extra_args: list[str] = []
    allow = list(recipe.allowlist)
    url = base_url or (environ.get(spec.base_url_env) if spec.base_url_env else None)
    if url:
        if not spec.base_url_env and not spec.base_url_args:
            raise ConfigError(f"the {recipe.name} recipe has no way to set the API's URL")
        allow.append(_host_of(url))
        if spec.base_url_env:
            env[spec.base_url_env] = url
        extra_args = [arg.replace("{url}", url) for arg in spec.base_url_args]
        if base_url:  # an explicit URL replaces the real API: only it is reachable
            allow = [_host_of(url)]
    if spec.api_key_env:
        key = environ.get(spec.api_key_env)
        if not key:
            raise ConfigError(
                f"{spec.api_key_env} is not set",
                hint=f"export {spec.api_key_env}=... (the agent gets it as a secret)",
            )
        # the VM gets a placeholder and the host's proxy puts the key into HTTPS requests
        # to the API's host; over plain HTTP (a local test API) it can only be given as is
        proxied = url is None or url.startswith("https://")
        hosts = (_host_of(url),) if url else tuple(recipe.allowlist)
        hidden[spec.api_key_env] = Secret(key, hosts) if proxied and hosts else key
    command = [*spec.command, *extra_args, *([] if tty else spec.headless), *args]
    return AgentPlan(command, env, hidden, tuple(dict.fromkeys(allow)))
