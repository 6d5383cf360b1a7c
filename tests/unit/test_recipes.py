"""Recipes: parsing with one clear line per mistake, the cache key, the build steps, the
layer's whiteouts, and the plan ``agent-vm agent`` runs (pure logic: no VM, no network)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_vm.errors import ConfigError
from agent_vm.execution.agents import agent_plan
from agent_vm.guest.defaults import parse as parse_defaults
from agent_vm.image.layer import _scan, defaults_json, steps
from agent_vm.image.recipe import SHIPPED, find_recipe, load_recipe
from agent_vm.secrets import Secret


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_recipe_parses(tmp_path: Path) -> None:
    (tmp_path / "motd").write_text("hi\n")
    path = write(
        tmp_path,
        """
name = "tools"
run = ["echo built > /opt/built"]
env = {EDITOR = "vi"}
user = "agent"
workdir = "/workspace"
allowlist = ["pypi.org", "*.github.com"]
files = [{source = "motd", dest = "/etc/motd", mode = "0600"}]
[apt]
packages = ["jq", "ripgrep"]
[pip]
packages = ["httpx==0.27.0"]
venv = "/opt/venv"
[npm]
packages = ["@scope/tool@1.2.3"]
""",
    )
    loaded = load_recipe(path)
    recipe = loaded.recipe
    assert recipe.apt_packages() == ["jq", "nodejs", "npm", "python3-venv", "ripgrep"]
    assert loaded.source(recipe.files[0]) == tmp_path / "motd"
    labels = [s.label for s in steps(loaded)]
    assert labels[1].startswith("apt: ") and labels[-1] == "clean-up"
    assert labels.index("file: /etc/motd") < labels.index("run: echo built > /opt/built")
    assert '"user": "agent"' in defaults_json(loaded)


def test_kernel_modules_are_installed_for_init_to_load(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, 'name = "x"\n[kernel]\nmodules = ["kvm_amd"]\n'))
    assert loaded.recipe.kernel.modules == ["kvm_amd"]
    plain = [s.label for s in steps(loaded)]
    assert not any(label.startswith("kernel modules") for label in plain)
    [step] = [s for s in steps(loaded, ["kvm", "kvm_amd"]) if s.label.startswith("kernel")]
    assert "for m in kvm kvm_amd;" in step.script and "/opt/agent-vm/modules/order" in step.script


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('name = "Bad Name"', "name: Value error"),
        ('name = "x"\nuser = "bob"', "user: "),
        ('name = "x"\nwhatever = 1', "whatever: Extra inputs"),
        ('name = "x"\n[apt]\npackages = ["jq; rm -rf /"]', "not a package name"),
        ('name = "x"\nallowlist = ["not a name!"]', "allowlist"),
        ('name = "x"\nworkdir = "relative"', "workdir"),
        ('name = "x"\nenv = {"A=B" = "1"}', "invalid environment variable"),
        ("name = ", "not valid TOML"),
        ('name = "x"\nfiles = [{source = "missing", dest = "/etc/x"}]', "cannot read missing"),
        ('name = "x"\nfiles = [{source = "r.toml", dest = "etc/x"}]', "must be an absolute"),
        ('name = "x"\n[kernel]\nmodules = ["kvm; reboot"]', "not a kernel module name"),
    ],
)
def test_a_bad_recipe_gets_one_line(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe(write(tmp_path, text))
    assert says in caught.value.message
    assert "\n" not in caught.value.message


def test_the_key_follows_every_input(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("one")
    path = write(tmp_path, 'name = "x"\nfiles = [{source = "f", dest = "/f"}]\n')
    first = load_recipe(path).key("base1")
    assert load_recipe(path).key("base1") == first  # stable
    assert load_recipe(path).key("base2") != first  # a new base image
    (tmp_path / "f").write_text("two")
    assert load_recipe(path).key("base1") != first  # a copied file's content
    write(tmp_path, 'name = "x"\nfiles = [{source = "f", dest = "/g"}]\n')
    assert load_recipe(path).key("base1") != first


def test_the_shipped_recipes_parse_and_name_their_agents() -> None:
    for name in SHIPPED:
        loaded = find_recipe(name)
        assert loaded.recipe.agent is not None and loaded.recipe.allowlist
    with pytest.raises(ConfigError, match="no agent called"):
        find_recipe("emacs")


def test_whiteouts_and_opaque_directories_become_deletions(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "usr/bin").mkdir(parents=True)
    (upper / "usr/bin/new").write_text("x")
    os.mknod(upper / "usr/bin/gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "etc/replaced").mkdir(parents=True)
    os.setxattr(upper / "etc/replaced", "trusted.overlay.opaque", b"y")
    keep, delete = _scan(upper)
    assert sorted(delete) == ["/etc/replaced", "/usr/bin/gone"]
    assert "usr/bin/gone" not in keep
    assert {"usr", "usr/bin", "usr/bin/new", "etc", "etc/replaced"} <= set(keep)


def test_the_agent_plan_keeps_the_key_out_of_the_command() -> None:
    claude = find_recipe("claude")
    plan = agent_plan(claude, ["fix it"], None, {"ANTHROPIC_API_KEY": "sk-1234"}, tty=False)
    assert plan.command[0] == "claude" and plan.command[-1] == "fix it"
    assert "--print" in plan.command and "sk-1234" not in " ".join(plan.command)
    key = plan.secrets["ANTHROPIC_API_KEY"]
    # the key stays on the host: the proxy injects it for the API's host only
    assert isinstance(key, Secret) and key.value == "sk-1234"
    assert key.hosts == ("api.anthropic.com",) and key.placeholder.startswith("agentvm-")
    assert plan.allowlist == ("api.anthropic.com",)
    interactive = agent_plan(claude, [], None, {"ANTHROPIC_API_KEY": "k" * 8}, tty=True)
    assert interactive.command == ["claude"]
    proxied = agent_plan(
        claude, [], "http://proxy.corp.test:8080", {"ANTHROPIC_API_KEY": "k" * 8}, tty=True
    )
    assert proxied.env == {"ANTHROPIC_BASE_URL": "http://proxy.corp.test:8080"}
    assert proxied.allowlist == ("proxy.corp.test",)  # only the proxy, not the real API
    assert proxied.secrets == {"ANTHROPIC_API_KEY": "k" * 8}  # plain HTTP: never injected
    from_env = agent_plan(
        claude, [], None,
        {"ANTHROPIC_API_KEY": "k" * 8, "ANTHROPIC_BASE_URL": "https://gw.corp.test"}, tty=True,
    )  # fmt: skip
    assert from_env.allowlist == ("api.anthropic.com", "gw.corp.test")
    gateway_key = from_env.secrets["ANTHROPIC_API_KEY"]
    assert isinstance(gateway_key, Secret) and gateway_key.hosts == ("gw.corp.test",)


@pytest.mark.parametrize(
    ("environ", "url", "says"),
    [
        ({}, None, "ANTHROPIC_API_KEY is not set"),
        ({"ANTHROPIC_API_KEY": "k"}, "ftp://x.test", "not an http\\(s\\) URL"),
        ({"ANTHROPIC_API_KEY": "k"}, "http://10.0.0.1", "names an address"),
    ],
)
def test_the_agent_plan_refuses_with_a_reason(
    environ: dict[str, str], url: str | None, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        agent_plan(find_recipe("claude"), [], url, environ, tty=False)


def test_guest_defaults_are_checked() -> None:
    parsed = parse_defaults('{"user": "agent", "workdir": "/w", "env": {"A": "1"}}')
    assert (parsed.user, parsed.workdir, parsed.env) == ("agent", "/w", {"A": "1"})
    assert parse_defaults('{"user": null, "workdir": null, "env": {}}').user == "root"
    for bad in ('{"user": "bob"}', '{"workdir": "rel"}', '{"env": {"A=B": "1"}}', "[]"):
        with pytest.raises(ValueError):
            parse_defaults(bad)
