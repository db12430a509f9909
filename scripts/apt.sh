#!/usr/bin/env bash
# Install the Debian packages of scripts/apt-packages.txt that are missing.
# No apt at all when every one is installed; `apt-get update` once, only when one is missing.
set -euo pipefail

mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$(dirname "$0")/apt-packages.txt" | grep -v '^$' || true)
((${#wanted[@]})) || exit 0

if ! command -v dpkg-query >/dev/null; then
    echo "apt: not a Debian system; install the equivalents of: ${wanted[*]}" >&2
    exit 1
fi
missing=()
for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q ' installed$' || missing+=("$package")
done
((${#missing[@]})) || exit 0

if [[ $(id -u) != 0 ]]; then
    echo "apt: missing Debian packages; as root run: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "apt: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Installing nginx or openssh-server must not start system-wide daemons: the tests run their
# own inside network namespaces (test VMs). policy-rc.d answering 101 tells dpkg "don't start";
# scripts/services.sh starts PostgreSQL and RabbitMQ itself when they are needed.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
