# shellcheck shell=bash
# Shared by ./agent-vm and ./run-tests: make a fresh Debian/Ubuntu machine able to run
# agent-vm. Idempotent and quick when everything is already in place, so it runs on every
# invocation instead of being a separate step a user could forget.

agentvm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
agentvm_venv="$agentvm_root/.venv"

agentvm_die() { echo "agent-vm bootstrap: $*" >&2; exit 1; }

# Packages of the given groups that dpkg does not report as installed (one dpkg-query for
# all of them: this runs on every invocation).
agentvm_missing_packages() {
    local groups=" $* " pkg group wanted=() installed
    while read -r pkg group; do
        [[ -z "$pkg" || "$pkg" == \#* ]] && continue
        [[ "$groups" == *" $group "* ]] && wanted+=("$pkg")
    done < "$agentvm_root/src/agent_vm/host/packages.txt"
    [[ ${#wanted[@]} -eq 0 ]] && return 0
    installed=" $(dpkg-query -W -f='${Package}:${Status}\n' "${wanted[@]}" 2>/dev/null \
        | sed -n 's/^\([^:]*\):install ok installed$/\1/p' | tr '\n' ' ') "
    for pkg in "${wanted[@]}"; do
        [[ "$installed" == *" $pkg "* ]] || echo "$pkg"
    done
}

agentvm_install_packages() {
    local missing
    missing=$(agentvm_missing_packages "$@" | tr '\n' ' ')
    [[ -z "${missing// /}" ]] && return 0
    [[ $EUID -eq 0 ]] || agentvm_die "missing packages: $missing. Run as root (or: sudo apt-get install $missing)."
    command -v apt-get >/dev/null || agentvm_die "no apt-get: agent-vm supports Debian 12 and Ubuntu 24.04 hosts. Missing: $missing"
    echo "agent-vm: installing host packages: $missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || agentvm_die "apt-get update failed (network or mirror problem?)"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >&2 \
        || agentvm_die "apt-get install failed for: $missing"
}

agentvm_python() {
    # Prefer the distribution's interpreter: it matches python3-venv/python3-dev installed above.
    local py
    for py in /usr/bin/python3 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$py"; return 0
        fi
    done
    agentvm_die "need Python >= 3.11 (Debian 12 and Ubuntu 24.04 ship it as python3)"
}

# Create or refresh .venv when pyproject.toml changed; $1 is the pip extra ("server": run
# VMs and serve them; "dev": that and the test tools). A dev venv also satisfies "server".
agentvm_venv_ready() {
    local extra="$1" stamp hash have
    stamp="$agentvm_venv/.agent-vm-stamp"
    hash="$(sha256sum "$agentvm_root/pyproject.toml" | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [[ "$have" == "$hash dev" || "$have" == "$hash $extra" ]]; then
        return 0
    fi
    echo "agent-vm: preparing Python environment in $agentvm_venv" >&2
    [[ -x "$agentvm_venv/bin/python" ]] || "$(agentvm_python)" -m venv "$agentvm_venv" >&2 \
        || agentvm_die "could not create virtualenv (is python3-venv installed?)"
    local spec="$agentvm_root"
    [[ -n "$extra" ]] && spec="$agentvm_root[$extra]"
    "$agentvm_venv/bin/python" -m pip install -q --upgrade pip >&2
    "$agentvm_venv/bin/python" -m pip install -q -e "$spec" >&2 \
        || agentvm_die "pip install failed (libvirt-python builds against libvirt-dev, pkg-config and gcc)"
    echo "$hash${extra:+ $extra}" > "$stamp"
}

# Wheels of what a client-only install needs (the package's own dependencies and its build
# tools), made once per pyproject.toml next to the venv: the test that installs agent-vm
# into a fresh venv without the host's parts takes them from here, never from the network.
agentvm_wheelhouse_ready() {
    local house="$agentvm_venv/wheelhouse" hash
    hash="$(sha256sum "$agentvm_root/pyproject.toml" | cut -d' ' -f1)"
    [[ "$(cat "$house/.stamp" 2>/dev/null || true)" == "$hash" ]] && return 0
    echo "agent-vm: preparing the client wheelhouse in $house" >&2
    rm -rf "$house"
    "$agentvm_venv/bin/python" -m pip wheel -q -w "$house" "$agentvm_root" >&2 \
        || agentvm_die "pip wheel failed (the client install test needs these wheels)"
    "$agentvm_venv/bin/python" -m pip download -q -d "$house" "setuptools>=77" wheel >&2 \
        || agentvm_die "pip download of the build tools failed"
    echo "$hash" > "$house/.stamp"
}
