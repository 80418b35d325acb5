#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its one-node Slurm cluster: slurmctld, slurmd,
# the Slurm client commands and munge, from the distribution's packages (Debian/Ubuntu); tmux,
# in which tests/test_dashboard.py watches the live dashboard in a real terminal; and iproute2
# (`ip`), with which tests/netns_hosts.py makes network-namespace hosts for the multi-host tests.
#
# Idempotent, and never fatal: does nothing when the commands are already there, and only
# prints why it did not install them when it cannot (not root, no apt-get, no network). The
# tests then skip the Slurm cases with that reason. The packages' own services are not started
# or enabled; the tests start private daemons with a generated slurm.conf.
set -u

needed=()
command -v slurmctld >/dev/null 2>&1 || needed+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || needed+=(slurmd)
command -v sbatch >/dev/null 2>&1 || needed+=(slurm-client)
command -v munged >/dev/null 2>&1 || needed+=(munge)
command -v tmux >/dev/null 2>&1 || needed+=(tmux)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || needed+=(iproute2)
command -v unshare >/dev/null 2>&1 || needed+=(util-linux)
if [ ${#needed[@]} -eq 0 ]; then
    echo "install-test-slurm: slurmctld, slurmd, slurm-client, munge, tmux and iproute2 are installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-slurm: not root; not installing ${needed[*]} (the tests that need them will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-slurm: no apt-get; not installing ${needed[*]} (the tests that need them will skip)"
    exit 0
fi
echo "install-test-slurm: installing ${needed[*]}"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the packages' postinst scripts must not start their system services
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
status=0
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends "${needed[@]}"; } \
    || status=$?
[ "$made_policy" -eq 1 ] && rm -f "$policy"
if [ "$status" -ne 0 ]; then
    echo "install-test-slurm: apt-get failed (exit $status); the tests that need them will skip"
fi
exit 0
