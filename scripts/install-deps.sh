#!/usr/bin/env bash
# Debian packages the project needs: gcc, binutils and make build the freestanding guest
# kernels and the C bench floor; python3-venv gives Debian's Python the venv the project
# installs into (scripts/venv.sh).  Installs only what is missing, so a ready machine costs
# nothing.  PYTHON (default python3) is the interpreter the venv will be made from.
set -euo pipefail
python=${PYTHON:-python3}
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null || need+=(binutils)
command -v make >/dev/null || need+=(make)
"$python" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    echo "install-deps: installing Debian packages: ${need[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}"
fi

# The host_mapping protection backend (vmm/memattr.py) splits VTL0's alias of guest memory
# into one mapping per protected range: alternating protections of N pages need 2N+1
# mappings, and the kernel's per-process limit (vm.max_map_count, 65530 by default) would
# refuse 64k of them.  Raise it where we may; otherwise say what the limit allows.
want_maps=262144
have_maps=$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 0)
if (( have_maps < want_maps )); then
    if [[ $(id -u) -eq 0 ]] && sysctl -q -w vm.max_map_count=$want_maps 2>/dev/null; then
        echo "install-deps: vm.max_map_count raised from $have_maps to $want_maps (host_mapping protections)"
    else
        echo "install-deps: vm.max_map_count is $have_maps; host_mapping protections refuse more than" \
             "about $(( (have_maps - 2048) / 2 )) alternating pages (sysctl -w vm.max_map_count=$want_maps raises it)"
    fi
fi
