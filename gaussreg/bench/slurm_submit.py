"""A big Slurm launch up to sbatch: a grid of 10,000 runs submitted with sbatch, squeue and
scontrol faked (shell scripts on PATH that answer at once), so only gaussreg's own work is timed.

    python -m gaussreg.bench.slurm_submit [--runs 10000] [--max-array-size 1001] [--out FILE]

Measures the seconds from the manifest to the first and the last sbatch, until the launch
returns and until every run directory is written (`plan` + `submit_slurm`, as
`gaussreg run --backend slurm` does them), and how many
sbatch calls (array jobs) the launch made."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from gaussreg import __version__
from gaussreg.launch.request import LaunchRequest, plan, submit_slurm
from gaussreg.runs.device import cpu_model


def fake_slurm(bin_dir: Path, max_array_size: int) -> Path:
    """sbatch (counts its calls, prints a job id), squeue (no jobs), scontrol (MaxArraySize)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "sbatch.calls"
    scripts = {"sbatch": f"#!/bin/sh\ndate +%s.%N >> {calls}\necho $((1000 + $(wc -l < {calls})))\n",
               "squeue": "#!/bin/sh\nexit 0\n",
               "scontrol": f"#!/bin/sh\necho 'MaxArraySize            = {max_array_size}'\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return calls


def manifest(runs: int) -> str:
    """One experiment of `runs` regularizer runs (a sigma x seed grid)."""
    seeds = max(1, runs // 100)
    sigmas = [round(0.01 * (i + 1), 4) for i in range(runs // seeds)]
    return (f'[[experiment]]\nname = "big"\ndataset = "synthetic"\nmodel = "mlp"\nmax_epochs = 1\n'
            f"seeds = {list(range(seeds))}\n"
            f"methods.regularizer = {{ sigma = {sigmas}, alpha = 1 }}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaussreg.bench.slurm_submit")
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--max-array-size", type=int, default=1001)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        calls = fake_slurm(d / "bin", args.max_array_size)
        os.environ["PATH"] = f"{d / 'bin'}:{os.environ['PATH']}"
        (d / "m.toml").write_text(manifest(args.runs))
        t0 = time.time()
        p = plan(LaunchRequest(str(d / "m.toml"), str(d / "runs"), backend="slurm"))
        t_plan = time.time() - t0
        sub = submit_slurm(p)
        total = time.time() - t0
        sbatch_at = [float(t) - t0 for t in calls.read_text().split()]
        # a big launch's run directories are written by a detached process after sbatch: until it is done
        logs = list((d / "runs" / "_slurm").glob("*/write-runs.log"))
        while logs and "wrote" not in logs[0].read_text():
            time.sleep(0.2)
        written = time.time() - t0
        out = {"runs": len(p.runs), "submitted": len(sub.submitted), "plan_s": round(t_plan, 2),
               "to_first_sbatch_s": round(sbatch_at[0], 2), "to_last_sbatch_s": round(sbatch_at[-1], 2),
               "submit_returned_s": round(total, 2), "directories_written_s": round(written, 2),
               "sbatch_calls": len(sbatch_at),
               "max_array_size": args.max_array_size, "cpu": cpu_model(),
               "cores": os.cpu_count(), "gaussreg": __version__}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
