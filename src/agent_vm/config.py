"""Settings: environment (``AGENT_VM_*``) over an optional TOML file over defaults.

The file is ``/etc/agent-vm/config.toml`` unless ``AGENT_VM_CONFIG`` names another one.
"""

from __future__ import annotations

import hashlib
import os
from ipaddress import IPv4Network
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent_vm.errors import ConfigError
from agent_vm.models import describe

DEFAULT_CONFIG_FILE = Path("/etc/agent-vm/config.toml")


class Settings(BaseSettings):
    """Everything a user may want to change without touching code."""

    model_config = SettingsConfigDict(env_prefix="AGENT_VM_", extra="ignore")

    state_dir: Path = Field(
        default=Path("/var/lib/agent-vm"),
        description="Image cache, per-VM overlays and logs live here.",
    )
    libvirt_uri: str = "qemu:///system"
    accel: Literal["auto", "kvm", "tcg"] = Field(
        default="auto", description="Force the accelerator instead of detecting it."
    )
    image: str = Field(default="default", description="Name of the guest image to use.")
    mirror: str | None = Field(
        default=None, description="Debian/Ubuntu mirror for image builds; default: the host's."
    )
    suite: str | None = Field(default=None, description="Distribution suite; default: host's.")
    boot_timeout: float = Field(default=60.0, description="Seconds to wait for agent READY.")
    network_name: str = Field(default="agentvm-nat", description="libvirt NAT network name.")
    network_bridge: str = Field(default="agvbr0", description="Its bridge device.")
    network_subnet: str = Field(
        default="10.213.0.0/21", description="Its IPv4 subnet (a /21: ~1,500 sandboxes)."
    )
    network_public_subnets: list[str] = Field(
        default_factory=list,
        description="Subnets of the host's own routes that sandboxes may reach as if they "
        "were the internet (every other routed subnet counts as the host's LAN and is "
        "refused), e.g. a test network.",
    )
    dns_upstream: list[str] | None = Field(
        default=None,
        description="Resolvers the sandbox resolver forwards to (host[:port]); "
        "default: the host's /etc/resolv.conf.",
    )
    uid_base: int = Field(
        default=2_000_000_000,
        description="Sandbox QEMUs run as users agvm-N with uid = gid = uid_base + N; group "
        "agentvm gets uid_base - 1.",
    )
    egress_proxy: bool = Field(
        default=True,
        description="Send sandboxes' web traffic (TCP 80, 443) through the host's egress "
        "proxy: names checked, secrets injected, refusals answered with a 403.",
    )
    egress_upstream_ca: Path | None = Field(
        default=None,
        description="More CA certificates (PEM) the proxy trusts upstream, besides the "
        "host's bundle (a company's CA; the tests' CA).",
    )
    ksm: bool = Field(
        default=False,
        description="Merge identical pages of running VMs (KSM): denser, at the price of a "
        "timing side channel between sandboxes (docs/security.md).",
    )
    shm_dir: Path | None = Field(
        default=None,
        description="Golden-state RAM files (tmpfs); default: one directory per state_dir.",
    )
    audit_log: Path | None = Field(
        default=None, description="The server's audit log; default: <state_dir>/audit/audit.log."
    )
    tokens_file: Path | None = Field(
        default=None, description="The server's API tokens; default: <state_dir>/tokens.json."
    )
    audit_max_bytes: int = Field(default=16 << 20, gt=0, description="Rotate past this size.")
    audit_keep: int = Field(default=8, ge=1, description="Rotated audit files kept.")
    anomaly_action: Literal["log", "pause", "kill"] = Field(
        default="log", description="What the server does to a sandbox an alert names."
    )
    anomaly_blocked_burst: int = Field(
        default=20, gt=0, description="Blocked attempts within the window that alert."
    )
    anomaly_blocked_window: float = Field(default=10.0, gt=0, description="... its seconds.")
    anomaly_output_bytes: int = Field(
        default=256 << 20, gt=0, description="Output of one execution that alerts (a flood)."
    )
    anomaly_load1: float = Field(
        default=64.0, gt=0, description="Guest load average that alerts (a process storm)."
    )
    anomaly_disk_fraction: float = Field(
        default=0.9, gt=0, le=1, description="Disk use (of its cap) that alerts."
    )
    anomaly_zscore: float = Field(
        default=4.0, gt=0, description="z-score over a sandbox's own window that alerts."
    )
    anomaly_window: int = Field(default=60, ge=5, description="Samples in that window.")
    anomaly_min_samples: int = Field(default=10, ge=3, description="Before a z-score counts.")
    anomaly_alert_interval: float = Field(
        default=60.0, ge=0, description="One alert per sandbox and rule in this many seconds."
    )
    monitor_interval: float = Field(
        default=1.0, gt=0, description="Seconds between the server's looks at its sandboxes."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("AGENT_VM_CONFIG", DEFAULT_CONFIG_FILE))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))

    def public_subnets(self) -> list[IPv4Network]:
        try:
            return [IPv4Network(s, strict=False) for s in self.network_public_subnets]
        except ValueError as exc:
            raise ConfigError(f"AGENT_VM_NETWORK_PUBLIC_SUBNETS: {exc}") from None

    def dns_upstreams(self) -> list[tuple[str, int]]:
        out = []
        for entry in self.dns_upstream or []:
            host, _, port = entry.partition(":")
            if not host or not (port or "53").isdigit() or not 0 < int(port or 53) < 65536:
                raise ConfigError(
                    f"AGENT_VM_DNS_UPSTREAM: {entry!r} is not host[:port]",
                    hint="e.g. AGENT_VM_DNS_UPSTREAM='[\"192.0.2.53:53\"]'",
                )
            out.append((host, int(port or 53)))
        return out

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit" / "audit.log"

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.state_dir / "tokens.json"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def build_cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def paused_dir(self) -> Path:
        """Paused sandboxes: memory, devices and disk of each (data, never reaped)."""
        return self.state_dir / "paused"

    @property
    def images_view(self) -> Path:
        """The read-only bind mount of images_dir that libvirt reads kernels through."""
        return Path("/run/agent-vm/images") / self.state_tag

    @property
    def state_tag(self) -> str:
        return hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:8]

    @property
    def ram_dir(self) -> Path:
        """Where golden RAM lives. Per state directory, so that two installations on one
        host never share (and overwrite) each other's golden RAM files."""
        if self.shm_dir is not None:
            return self.shm_dir
        return Path("/dev/shm/agent-vm") / self.state_tag


def load_settings() -> Settings:
    """The settings, or ConfigError naming the bad variable or file entry."""
    try:
        return Settings()
    except ValidationError as exc:
        source = os.environ.get("AGENT_VM_CONFIG", str(DEFAULT_CONFIG_FILE))
        raise ConfigError(
            describe(exc, "invalid setting", lambda field: f"AGENT_VM_{field.upper()}"),
            hint=f"check the AGENT_VM_* environment variables and {source}",
        ) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"cannot read the settings: {exc}") from None
