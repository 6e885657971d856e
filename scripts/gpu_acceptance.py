"""GPU acceptance: one command that says, stage by stage, whether the CUDA path works.

    python scripts/gpu_acceptance.py                # one CUDA GPU, under 10 minutes
    python scripts/gpu_acceptance.py --multi-gpu    # one node: TP+SP, CP, PP, HSDP vs 1 GPU
    python scripts/gpu_acceptance.py --cpu-smoke    # CI: every CPU-capable stage, tiny shapes

A thin runner of the tests marked `gpu` (tests/gpu/test_acceptance.py says what each stage
checks): it selects them with pytest, then prints one row per stage (result, seconds,
figures) and `gpu acceptance: N/M passed` (M counts the stages that ran). A failure or a
timeout does not stop the later stages; a stage that cannot run here is skipped with the
reason. The exit status is 0 iff nothing that ran failed.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests" / "gpu" / "test_acceptance.py"


class StageTable:
    """A pytest plugin collecting (stage, result, seconds, figures) per stage."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if "stage" not in props or (report.when != "call" and report.passed):
            return
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            status, figures = "skipped: " + reason.removeprefix("Skipped: "), ""
        elif report.failed:
            crash = report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash") else ""
            timed_out = "StageTimeout" in crash or "TimeoutExpired" in crash
            status, figures = ("FAIL (timeout)" if timed_out else "FAIL"), crash.splitlines()[0] if crash else ""
        else:
            status, figures = "pass", str(props.get("figures", ""))
        self.rows.append((props["stage"], status, report.duration, figures))

    def print(self) -> int:
        """The table and the summary line; the exit status (0 iff nothing that ran failed)."""
        if not self.rows:
            print("no stage ran")
            return 1
        width = max(len(r[0]) for r in self.rows)
        status_width = max(len(r[1]) for r in self.rows)
        print()
        print(f"{'stage':<{width}}  {'result':<{status_width}}  {'s':>5}  figures")
        print("-" * (width + status_width + 20))
        for stage, status, seconds, figures in self.rows:
            print(f"{stage:<{width}}  {status:<{status_width}}  {seconds:>5.0f}  {figures}")
        ran = [r for r in self.rows if not r[1].startswith("skipped")]
        passed = sum(r[1] == "pass" for r in ran)
        print(f"gpu acceptance: {passed}/{len(ran)} passed")
        return 0 if passed == len(ran) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    mode.add_argument("--multi-gpu", action="store_true", help="parallelism stages, one node")
    p.add_argument("--out", type=Path, default=None,
                   help="scratch folder for logs and dumps (default: a temporary folder)")
    a = p.parse_args()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("run this script as one process: --multi-gpu launches torchrun itself")
    out = (a.out or Path(tempfile.mkdtemp(prefix="gpu_acceptance_"))).resolve()
    os.environ["MOT_GPU_ACCEPTANCE_OUT"] = str(out)
    if a.cpu_smoke:
        os.environ["MOT_GPU_ACCEPTANCE"] = "cpu-smoke"
    device = (f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
              if torch.cuda.is_available() and not a.cpu_smoke else "cpu")
    print(f"device {device}, torch {torch.__version__}, "
          f"mode {'cpu-smoke' if a.cpu_smoke else 'multi-gpu' if a.multi_gpu else 'single-gpu'}, "
          f"logs under {out}", flush=True)
    table = StageTable()
    pytest.main([str(TESTS), "-m", "multi_gpu" if a.multi_gpu else "gpu and not multi_gpu",
                 "-q", "-p", "no:cacheprovider"], plugins=[table])
    return table.print()


if __name__ == "__main__":
    sys.exit(main())
