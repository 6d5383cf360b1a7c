"""Recipe images for real: a layer built from a small recipe (a Debian package, a file,
a deletion, environment, user, working directory), booted and checked from inside; the
same recipe again is the same layer; a changed recipe is a new layer on the same base."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest_asyncio

from agent_vm.execution.executor import AgentExecutor
from agent_vm.execution.runtime import Runtime
from agent_vm.image.store import Image

RECIPE = """
name = "recipe-test"
files = [{source = "motd", dest = "/etc/agent-motd", mode = "0600"}]
run = ["rm /usr/bin/yes", "echo built > /opt/built"]
user = "agent"
workdir = "/tmp"
env = {GREETING = "hello from the recipe"}
allowlist = ["web.allowed.test"]

[apt]
packages = ["jq"]
"""

PROBE = r"""
import json, os, pwd, shutil, subprocess
print(json.dumps({
    "user": pwd.getpwuid(os.getuid()).pw_name, "cwd": os.getcwd(),
    "greeting": os.environ.get("GREETING"),
    "jq": subprocess.run(["jq", "--version"], capture_output=True, text=True).stdout.strip(),
    "yes": shutil.which("yes"), "built": open("/opt/built").read(),
}))
"""


@pytest_asyncio.fixture(scope="module")
async def recipe_dir(tmp_path_factory: object) -> Path:
    root: Path = tmp_path_factory.mktemp("recipe")  # type: ignore[attr-defined]
    (root / "motd").write_text("one\n")
    (root / "r.toml").write_text(RECIPE)
    return root


@pytest_asyncio.fixture(scope="module")
async def layered(runtime: Runtime, recipe_dir: Path) -> Image:
    return await runtime.build_recipe(recipe_dir / "r.toml")


async def test_a_recipe_image_has_what_the_recipe_says(
    runtime: Runtime, layered: Image, image: Image
) -> None:
    layer = layered.manifest.layer
    assert layer is not None and layer.base_key == image.key
    assert layer.removed == 1  # /usr/bin/yes, a whiteout applied in the guest
    assert layered.allowlist == ("web.allowed.test",)
    vm = await runtime.vm(image=layered, spec=runtime.spec(network="isolated"))
    try:
        executor = AgentExecutor()
        seen = json.loads((await executor.execute(vm, code=PROBE, timeout=120)).stdout)
        motd = await executor.execute(vm, "stat -c '%a %U' /etc/agent-motd; cat /etc/agent-motd",
                                      user="root")  # fmt: skip
    finally:
        await vm.close()
    assert seen == {
        "user": "agent", "cwd": "/tmp", "greeting": "hello from the recipe",
        "jq": seen["jq"], "yes": None, "built": "built\n",
    }  # fmt: skip
    assert seen["jq"].startswith("jq-")
    assert motd.stdout == "600 root\none\n"


def test_the_layer_shares_the_base_disk(layered: Image, image: Image) -> None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(layered.disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["backing-filename"] == str(image.disk)
    # the layer holds what the recipe added (jq and its libraries), not a copy of the base
    assert info["actual-size"] < image.disk.stat().st_size / 4


async def test_an_unchanged_recipe_is_reused_and_a_change_rebuilds_only_the_layer(
    runtime: Runtime, layered: Image, image: Image, recipe_dir: Path
) -> None:
    again = await runtime.build_recipe(recipe_dir / "r.toml")
    assert (again.key, again.path, again.manifest.created_at) == (
        layered.key, layered.path, layered.manifest.created_at,
    )  # fmt: skip
    (recipe_dir / "motd").write_text("two\n")
    changed = await runtime.build_recipe(recipe_dir / "r.toml")
    assert changed.key != layered.key
    assert changed.manifest.layer is not None
    assert changed.manifest.layer.base_key == image.key  # the same base, not rebuilt
    assert (await runtime.image()).manifest.created_at == image.manifest.created_at
    runtime.images.remove("recipe-test")
