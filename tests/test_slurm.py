"""The workflow on a real SLURM cluster (profiles/slurm-ci): one SLURM job per step, the same
numbers as a local run, and a job killed with scancel is rerun alone (with what depends on it).

Skipped unless ENTROPY_PROBE_SLURM=1. ci/slurm/run.sh sets it after installing the slurm executor
plugin and starting the single-node cluster of ci/slurm/local-cluster.sh; with the variable
set, a missing cluster or plugin is a failure, not a skip.

One scenario, run once per module (about 8 minutes on 2 cores shared with other work):
  1. the reduced config locally (``--cores 2``), at the same time as
  2. the same config with ``--profile profiles/slurm-ci``; when the SLURM job of snis_shard
     shard 000 is RUNNING, it is scancel'ed; the run goes on (keep-going) and fails;
  3. a dry run then lists only that job and what depends on it (the same jobs as
     ``--forcerun <its output> -n`` in the finished local run);
  4. the rerun with the profile finishes and submits only those jobs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(os.environ.get("ENTROPY_PROBE_SLURM") != "1",
                       reason="SLURM check: set ENTROPY_PROBE_SLURM=1 (bash ci/slurm/run.sh does)"),
]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm-ci"
# Small, but sharded: 16 E prompt groups in 2 E shards (8 U prompts in 1 U shard).
REDUCED = {"E_total_sequences": 64, "B_U": 8, "G": 4, "E_num_shards": 2, "U_num_shards": 1}
# Fresh rollouts at one η, not at each of the sweep's six: every stage still runs, as a SLURM job
# each (a job costs the cluster's submission and polling round trip more than its work).
ESTIMATOR = {"fresh_etas": [1.0e-3]}
# The job to scancel: SNIS shard 000 (a shard job late in the DAG, so the rerun is short).
VICTIM = ("snis_shard", "000")  # (rule, wildcards as the plugin joins them)
VICTIM_OUTPUT = "results/snis/shard_000.safetensors"
# Seconds per snakemake run: a safety net (a mis-set status command hangs forever).
RUN_TIMEOUT = int(os.environ.get("ENTROPY_PROBE_SLURM_RUN_TIMEOUT", "1200"))
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)
# The tiny policy is per-op-overhead bound: one thread is faster, and both runs use the same
# thread count (so the SLURM run must reproduce the local numbers exactly).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def snakemake_cmd(*args: str) -> list[str]:
    # `timeout`: a mis-set status command makes the slurm plugin poll forever without a word.
    return ["timeout", "-k", "30", str(RUN_TIMEOUT), sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
            *args, "--configfile", "ci.yaml"]  # --configfile last: it takes several values


def start(workdir: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    handle = log.open("w")
    proc = subprocess.Popen(snakemake_cmd(*args), cwd=workdir, stdout=handle, stderr=subprocess.STDOUT, env=ENV)
    handle.close()
    return proc, log


def job_stats(text: str) -> Counter:
    """Rule -> job count from the first 'Job stats' table snakemake printed in text."""
    rows: dict[str, int] = {}
    for line in text.split("Job stats:", 1)[1].splitlines() if "Job stats:" in text else []:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line)
        if m:
            rows[m.group(1)] = int(m.group(2))
        elif rows:
            break
    rows.pop("total", None)
    return Counter(rows)


def submissions(log_text: str, workdir: Path) -> list[tuple[str, str, str]]:
    """(rule, wildcards, SLURM job id) of every sbatch submission in a snakemake log."""
    out = []
    for _, slurm_id, path in SUBMITTED.findall(log_text):
        rel = (workdir / path).resolve().relative_to((workdir / ".snakemake" / "slurm_logs").resolve())
        rule = rel.parts[0].removeprefix("rule_")
        wildcards = rel.parts[1] if len(rel.parts) == 3 else ""
        out.append((rule, wildcards, slurm_id))
    return out


def squeue_all() -> dict[str, tuple[str, str]]:
    """SLURM job id -> (state, comment) of every job squeue still lists (finished ones for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return {i: (state, comment) for i, state, comment in (line.split("|", 2) for line in out.splitlines() if line)}


def processes_under(root: Path) -> list[str]:
    """Command lines of processes whose working directory is under root (leftovers of a job)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(root):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def check_not_timed_out(returncode: int, log: Path) -> None:
    """A run that `timeout` stopped leaves nothing worth checking: fail the whole scenario."""
    if returncode in (124, 137, -9, -15):
        raise AssertionError(f"snakemake ran past {RUN_TIMEOUT} s (ENTROPY_PROBE_SLURM_RUN_TIMEOUT) and was "
                             f"stopped (rc {returncode}); {log} ends with:\n{log.read_text()[-3000:]}")


def start_oracle(local: Path, local_proc: subprocess.Popen, local_log: Path) -> tuple[subprocess.Popen, Path]:
    """Once the local run is done: a dry run there of the victim's output forced, i.e. the jobs that
    a lost victim takes with it (run while the SLURM run goes on)."""
    check_not_timed_out(local_proc.returncode, local_log)
    return start(local, "lost", "-n", "--forcerun", VICTIM_OUTPUT)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Runs the scenario once; returns what the tests check."""
    for tool in ("sbatch", "squeue", "scancel", "sinfo"):
        assert shutil.which(tool), f"{tool} not found: start the cluster first (bash ci/slurm/run.sh does)"
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert sinfo.returncode == 0 and re.search(r"idle|mixed|allocated", sinfo.stdout), \
        f"no usable SLURM node: {sinfo.stdout}{sinfo.stderr}"
    plugin = subprocess.run([sys.executable, "-c", "import snakemake_executor_plugin_slurm"], capture_output=True)
    assert plugin.returncode == 0, "snakemake-executor-plugin-slurm is not installed (bash ci/slurm/run.sh installs it)"

    root = tmp_path_factory.mktemp("slurm")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["batch_config"].update(REDUCED)
    config["estimator"].update(ESTIMATOR)
    local, slurm = root / "local", root / "slurm"
    for d in (local, slurm):
        d.mkdir()
        (d / "ci.yaml").write_text(yaml.safe_dump(config))

    result = {"root": root, "local": local, "slurm": slurm, "timings": {}, "squeue": {}}
    procs = []
    t0 = time.monotonic()
    try:
        # 1 + 2: the local run and the SLURM run side by side (the SLURM run idles between polls).
        local_proc, local_log = start(local, "local", "--cores", "2")
        procs.append(local_proc)
        slurm_proc, slurm_log1 = start(slurm, "slurm1", "--profile", str(PROFILE))
        procs.append(slurm_proc)
        victim_id, oracle = None, None
        while slurm_proc.poll() is None:
            jobs = squeue_all()
            result["squeue"].update(jobs)
            if victim_id is None:
                for job_id, (state, comment) in jobs.items():
                    if comment == f"rule_{VICTIM[0]}_wildcards_{VICTIM[1]}" and state == "RUNNING":
                        subprocess.run(["scancel", job_id], check=True, timeout=30)
                        victim_id = job_id
                        result["victim_killed_after_s"] = round(time.monotonic() - t0, 1)
            if oracle is None and local_proc.poll() is not None:
                result["timings"]["local_run_s"] = round(time.monotonic() - t0, 1)
                oracle = start_oracle(local, local_proc, local_log)
                procs.append(oracle[0])
            time.sleep(1)
        result["squeue"].update(squeue_all())
        result["timings"]["slurm_killed_run_s"] = round(time.monotonic() - t0, 1)
        check_not_timed_out(slurm_proc.returncode, slurm_log1)
        result["victim_id"] = victim_id
        result["slurm1_rc"] = slurm_proc.returncode
        result["slurm1_log"] = slurm_log1.read_text()
        result["victim_output_after_kill"] = (slurm / VICTIM_OUTPUT).exists()
        if oracle is None:
            local_proc.wait(timeout=RUN_TIMEOUT + 60)
            result["timings"]["local_run_s"] = round(time.monotonic() - t0, 1)
            oracle = start_oracle(local, local_proc, local_log)
            procs.append(oracle[0])
        result["local_rc"], result["local_log"] = local_proc.returncode, local_log.read_text()
        oracle[0].wait(timeout=RUN_TIMEOUT)
        result["lost_log"] = oracle[1].read_text()

        # 3: what a rerun would do.
        t = time.monotonic()
        dry = subprocess.run(snakemake_cmd("--profile", str(PROFILE), "-n"), cwd=slurm, capture_output=True,
                             text=True, env=ENV)
        result["dry_rc"], result["dry_log"] = dry.returncode, dry.stdout + dry.stderr
        result["timings"]["dry_run_s"] = round(time.monotonic() - t, 1)

        # 4: the rerun.
        t = time.monotonic()
        rerun, slurm_log2 = start(slurm, "slurm2", "--profile", str(PROFILE))
        procs.append(rerun)
        while rerun.poll() is None:
            result["squeue"].update(squeue_all())
            time.sleep(1)
        result["squeue"].update(squeue_all())
        check_not_timed_out(rerun.returncode, slurm_log2)
        result["slurm2_rc"] = rerun.returncode
        result["slurm2_log"] = slurm_log2.read_text()
        result["timings"]["slurm_rerun_s"] = round(time.monotonic() - t, 1)
        result["timings"]["total_s"] = round(time.monotonic() - t0, 1)
        print(f"\nSLURM check timings: {result['timings']}; victim SLURM job {victim_id} "
              f"scancel'ed {result.get('victim_killed_after_s')} s in", file=sys.stderr)
        yield result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # snakemake cancels its SLURM jobs on SIGTERM
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        # Nothing of ours may stay queued (the cluster may be shared with a developer's jobs).
        ours = set()
        for name in ("slurm1.log", "slurm2.log"):
            if (slurm / name).exists():
                ours |= {s for _, _, s in submissions((slurm / name).read_text(), slurm)}
        leftover = [i for i, (state, _) in squeue_all().items() if i in ours and state in ("PENDING", "RUNNING")]
        if leftover:
            subprocess.run(["scancel", *leftover], timeout=30)


def failure_context(result: dict, key: str) -> str:
    return f"\n--- {key} (tail) ---\n{result[key][-5000:]}"


def lost_jobs(scenario) -> Counter:
    """Rule -> count of the jobs that depend on the victim (itself included), from the local run."""
    lost = job_stats(scenario["lost_log"])
    lost.pop("all", None)
    assert lost[VICTIM[0]] == 1 and lost["summary"] == 1 and sum(lost.values()) < 10, \
        failure_context(scenario, "lost_log")
    return lost


def test_local_run_finishes(scenario):
    assert scenario["local_rc"] == 0, failure_context(scenario, "local_log")


def test_killed_job_was_running_and_failed_the_run(scenario):
    assert scenario["victim_id"], f"the {VICTIM[0]} {VICTIM[1]} job was never seen RUNNING" + \
        failure_context(scenario, "slurm1_log")
    assert scenario["squeue"][scenario["victim_id"]][0] == "CANCELLED"
    assert scenario["slurm1_rc"] == 1, failure_context(scenario, "slurm1_log")
    assert re.search(rf"SLURM-job '{scenario['victim_id']}' failed, SLURM status is: 'CANCELLED'",
                     scenario["slurm1_log"]), failure_context(scenario, "slurm1_log")
    assert not scenario["victim_output_after_kill"]


def test_one_slurm_job_per_step(scenario):
    """Every job of the DAG (the local run's job table, less the target rule `all`) was one SLURM job:
    the first run submitted each job once except those downstream of the killed one, the rerun
    submitted the killed job again and its downstream; squeue knew each job id under its rule."""
    dag = job_stats(scenario["local_log"])
    assert dag["rollout"] == 3 and dag["teacher_force_x"] == 2 and dag["snis_shard"] == 2, dag
    dag.pop("all")
    lost = lost_jobs(scenario)
    first = submissions(scenario["slurm1_log"], scenario["slurm"])
    again = submissions(scenario["slurm2_log"], scenario["slurm"])
    assert Counter(rule for rule, _, _ in first) == dag - lost + Counter({VICTIM[0]: 1}), \
        failure_context(scenario, "slurm1_log")
    assert Counter(rule for rule, _, _ in first + again) == dag + Counter({VICTIM[0]: 1})
    assert len({(rule, wc) for rule, wc, _ in first}) == len(first), f"a job was submitted twice: {first}"
    assert {wc for rule, wc, _ in first if rule == "rollout"} == {"E_000", "E_001", "U_000"}
    for rule, wc, slurm_id in first + again:
        comment = f"rule_{rule}_wildcards_{wc}" if wc else f"rule_{rule}"
        assert scenario["squeue"].get(slurm_id, (None, None))[1] == comment, (slurm_id, comment)
        state = scenario["squeue"][slurm_id][0]
        assert state == ("CANCELLED" if slurm_id == scenario["victim_id"] else "COMPLETED"), (rule, wc, state)
        assert (scenario["slurm"] / ".snakemake" / "slurm_logs" / f"rule_{rule}" / wc / f"{slurm_id}.log").is_file()


def test_dry_run_after_the_kill_lists_only_the_lost_job_and_its_downstream(scenario):
    assert scenario["dry_rc"] == 0, failure_context(scenario, "dry_log")
    planned, lost = job_stats(scenario["dry_log"]), lost_jobs(scenario)
    planned.pop("all", None)
    assert planned == lost, failure_context(scenario, "dry_log")
    outputs = re.findall(r"^\s*output: (.+)$", scenario["dry_log"], flags=re.M)
    assert VICTIM_OUTPUT in outputs and "results/snis/shard_001.safetensors" not in outputs


def test_rerun_submits_only_the_lost_jobs_and_finishes(scenario):
    assert scenario["slurm2_rc"] == 0, failure_context(scenario, "slurm2_log")
    subs = submissions(scenario["slurm2_log"], scenario["slurm"])
    assert Counter(rule for rule, _, _ in subs) == lost_jobs(scenario), failure_context(scenario, "slurm2_log")
    assert (VICTIM[0], VICTIM[1]) in {(rule, wc) for rule, wc, _ in subs}
    for _, _, slurm_id in subs:
        assert scenario["squeue"].get(slurm_id, ("?",))[0] == "COMPLETED", slurm_id


def test_slurm_numbers_equal_the_local_run(scenario):
    local = json.loads((scenario["local"] / "results" / "summary.json").read_text())
    slurm = json.loads((scenario["slurm"] / "results" / "summary.json").read_text())
    assert local["first_order"]["X_dot_v"] == slurm["first_order"]["X_dot_v"]
    assert len(local["rows"]) == len(slurm["rows"]) == len(local["config"]["estimator"]["eta_list"])
    for a, b in zip(local["rows"], slurm["rows"]):
        assert a["eta"] == b["eta"]
        for key in ("delta_h1", "delta_h1_se", "delta_h", "delta_h_se"):
            assert a[key] == b[key], (a["eta"], key, a[key], b[key])


def test_no_process_left_behind(scenario):
    assert processes_under(scenario["root"]) == []
