"""advalign.stage: what a workflow script's process does around its main."""

import subprocess
import sys
import textwrap


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_figure_table_and_statistics_modules_do_not_import_torch(tmp_path):
    # Thirteen figure jobs and five table/statistics jobs run per demo; torch's import is seconds each.
    result = _python(
        """
        import sys
        import advalign.figures, advalign.tables, advalign.stats, advalign.stage, advalign.io
        print(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_finished_snakemake_job_exits_at_once_with_its_log_flushed(tmp_path):
    result = _python(
        """
        import sys
        from advalign.stage import run

        class Job:  # what Snakemake's script preamble hands a script, as far as run() reads it
            log = ["job.log"]
            threads = 1
        Job.__module__ = "snakemake.script"

        def main(smk):
            print("written by main")
            with open("out.txt", "w") as fh:
                fh.write("output")

        run(Job(), main)
        print("after run", file=sys.__stderr__)  # not reached: the process has ended
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "after run" not in result.stderr
    assert (tmp_path / "out.txt").read_text() == "output"
    log = (tmp_path / "job.log").read_text()
    assert "written by main" in log and "done in" in log


def test_a_failed_job_exits_1_with_one_line(tmp_path):
    result = _python(
        """
        from advalign.io import PipelineError
        from advalign.stage import run

        class Job:
            log = ["job.log"]
            threads = 1
        Job.__module__ = "snakemake.script"

        def main(smk):
            raise PipelineError("data/x.npz: missing array 'labels'")

        run(Job(), main)
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: data/x.npz: missing array 'labels'"
    assert "error: data/x.npz: missing array 'labels'" in (tmp_path / "job.log").read_text()


def test_outside_snakemake_run_returns(tmp_path):
    result = _python(
        """
        from advalign.stage import run

        class Stand_in:
            log = []
            threads = None

        run(Stand_in(), lambda smk: None)
        print("returned")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "returned"
