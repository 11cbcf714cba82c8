"""Which BLAS the MLX CPU backend ends up with depends on import order; check both orders."""

import os
import subprocess
import sys

import pytest

from elm_mlx import _blas

HAS_OPENBLAS = sys.platform == "linux" and _blas.use_openblas() is not None

DESCRIBE = "from elm_mlx import _blas\nprint(_blas.describe())"


def run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )


@pytest.mark.skipif(not HAS_OPENBLAS, reason="OpenBLAS is only selected on Linux with it installed")
def test_importing_elm_first_selects_openblas():
    proc = run("import elm_mlx\n" + DESCRIBE)
    assert "OpenBLAS" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


@pytest.mark.skipif(not HAS_OPENBLAS, reason="OpenBLAS is only selected on Linux with it installed")
def test_importing_mlx_first_warns_and_reports_reference_blas():
    proc = run("import mlx.core\nimport elm_mlx\n" + DESCRIBE)
    assert "reference BLAS" in proc.stdout
    assert "RuntimeWarning" in proc.stderr and "`import elm_mlx` line above" in proc.stderr


@pytest.mark.skipif(not HAS_OPENBLAS, reason="OpenBLAS is only selected on Linux with it installed")
def test_the_warnings_ld_preload_selects_openblas_in_any_order():
    """The warning's other advice: LD_PRELOAD with the path it names."""
    warning = run("import mlx.core\nimport elm_mlx").stderr
    path = warning.split("LD_PRELOAD=")[1].split()[0]
    env = {**os.environ, "LD_PRELOAD": path}
    proc = run("import mlx.core\nimport elm_mlx\n" + DESCRIBE, env)
    assert "OpenBLAS" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr
