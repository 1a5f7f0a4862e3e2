"""Running the project's Snakefile in a scratch working directory (for the workflow tests)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_snakemake(workdir: Path, configfile: str, *args: str, check: bool = True,
                  timeout: int = 900) -> subprocess.CompletedProcess:
    """``snakemake -s <repo>/Snakefile --directory <workdir> ARGS --configfile <workdir>/<configfile>``,
    one thread per job unless ARGS say otherwise (the tests' models are tiny: per-op overhead, where
    a second thread only slows a job down and takes the core another job could use)."""
    threads = () if any(a.startswith("--max-threads") for a in args) else ("--max-threads", "1")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           *threads, *args, "--configfile", str(workdir / configfile)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return result


def dry_run_jobs(workdir: Path, configfile: str, *targets: str) -> dict[str, int]:
    """Rule name -> number of jobs a dry run would execute ({} when there is nothing to do)."""
    result = run_snakemake(workdir, configfile, *targets, "-n")
    return _job_table(result.stdout + result.stderr)


def json_numbers(obj, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, keyed by its path ("/rows[0]/delta_h")."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in json_numbers(value, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in json_numbers(value, f"{path}[{i}]").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {path: float(obj)}
    return {}


def dry_run_jobs_with(workdir: Path, *args: str) -> dict[str, int]:
    """Rule name -> number of jobs of ``snakemake -n ARGS`` in ``workdir`` (no config file added)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "-n", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return _job_table(result.stdout + result.stderr)


def _job_table(out: str) -> dict[str, int]:
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = dict((name, int(n)) for name, n in re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M))
    jobs.pop("total", None)
    return jobs


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, and untracked but not ignored:
    what a commit of the working tree would hold) copied to ``dest``."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def run_in(workdir: Path, script: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``bash -euo pipefail -c SCRIPT`` in ``workdir`` with this Python's environment first on PATH
    (so that ``snakemake`` and ``python`` are the ones under test); fails with the output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"in {workdir}:\n{script}\nfailed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def raises_one_line(error_type, call, *fragments: str) -> str:
    """``call()`` raises ``error_type`` with a one-line message containing every fragment; the message."""
    import pytest

    with pytest.raises(error_type) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message
