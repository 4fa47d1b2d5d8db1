#!/usr/bin/env bash
# Installs everything espswitch and its tests need on Debian 12, as root.
# Idempotent: packages already present are left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 2
fi

apt_pkgs=(tshark tcpdump iproute2 iputils-ping iperf3 procps kmod nftables
          openvswitch-switch openvswitch-common
          strongswan strongswan-swanctl charon-systemd libcharon-extra-plugins
          libstrongswan-extra-plugins libcharon-extauth-plugins libstrongswan-standard-plugins
          strongswan-pki
          # the compiled fast path: C compiler (and libasan/libubsan for
          # scripts/asan-fuzz.sh), Python and OpenSSL headers
          build-essential python3-dev libssl-dev zlib1g-dev
          # bench/crypto_backends.py: libipsec-mb measured beside OpenSSL (a benchmark only)
          libipsec-mb-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian package starts a system-wide ovsdb-server/ovs-vswitchd; espswitch runs its own
# ovsdb-server and replaces ovs-vswitchd, so the packaged service stays off.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet openvswitch-switch 2>/dev/null; then
    systemctl stop openvswitch-switch || true
fi

# Debian marks its Python as externally managed; as root on a dedicated host we install
# into /usr/local, which is what pip does for root anyway.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e "$here[test,bench]"
