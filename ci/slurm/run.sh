#!/usr/bin/env bash
# CI step "SLURM": the workflow end to end on a real single-node SLURM cluster.
#
#   bash ci/slurm/run.sh [extra pytest args]      (as root: it apt-installs and starts daemons)
#
# 1. pip-installs the slurm executor plugin (pinned: the version verified with snakemake 9.x);
# 2. starts slurmctld + slurmd + munged on loopback with ci/slurm/local-cluster.sh
#    (apt-installs slurm-wlm and munge if missing), unless a cluster is already up;
# 3. runs tests/test_slurm.py (profiles/slurm-ci): one SLURM job per step, the numbers of a local
#    run, a scancel'ed job rerun alone;
# 4. stops the daemons it started (trap), also on failure or Ctrl-C.
# Exits non-zero if any of it fails.
#
# Environment: SLURM_LOCAL_CLUSTER (the start/stop script; default ci/slurm/local-cluster.sh),
# SLURM_PLUGIN (pip requirement), SLURM_STEP_TIMEOUT (seconds, whole test run), SLURM_CHECK_DIR
# (where the runs go), ENTROPY_PROBE_SLURM_RUN_TIMEOUT (seconds per snakemake run, see
# tests/test_slurm.py), and local-cluster.sh's own SLURM_LOCAL_* variables.
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
CLUSTER="${SLURM_LOCAL_CLUSTER:-$(pwd)/ci/slurm/local-cluster.sh}"
PLUGIN="${SLURM_PLUGIN:-snakemake-executor-plugin-slurm==2.8.0}"
STEP_TIMEOUT="${SLURM_STEP_TIMEOUT:-1500}"  # a safety net over the per-run timeouts of the test
WORK="${SLURM_CHECK_DIR:-${TMPDIR:-/tmp}/entropy-probe-slurm-check}"  # run dirs + logs, kept for a look (emptied at the next run)

log() { echo "[ci/slurm] $*" >&2; }
[ -f "$CLUSTER" ] || { log "ERROR: cluster script not found: $CLUSTER (set SLURM_LOCAL_CLUSTER)"; exit 1; }

log "installing $PLUGIN"
python -m pip install -q --root-user-action=ignore "$PLUGIN"

if bash "$CLUSTER" status >/dev/null 2>&1; then
  log "a SLURM cluster is already up: using it, leaving it running"
else
  trap 'log "stopping the cluster"; bash "$CLUSTER" stop || true' EXIT
  trap 'exit 130' INT TERM  # so that the EXIT trap runs on Ctrl-C / kill too
  bash "$CLUSTER" start
fi
log "setup took $((SECONDS - t0)) s"

rc=0
ENTROPY_PROBE_SLURM=1 timeout -k 30 "$STEP_TIMEOUT" \
  python -m pytest -q -s -rs -p no:cacheprovider --basetemp "$WORK" tests/test_slurm.py "$@" || rc=$?
log "SLURM step: $((SECONDS - t0)) s, rc=$rc (runs and logs: $WORK)"
exit "$rc"
