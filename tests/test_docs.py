"""The documentation site builds with warnings as errors, its fast examples run."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what earlier builds generated in docs/ and examples/: the test builds from scratch
GENERATED = shutil.ignore_patterns("_build", "generated", "auto_examples",
                                   "sg_execution_times.rst", "__pycache__", "*_maps.png")


def test_docs_build_without_warnings(tmp_path):
    # a copy of docs/ and examples/: a build writes the pages it generates into its
    # source folder, and runs the examples in theirs
    for name in ("docs", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=GENERATED)
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               str(tmp_path / "docs"), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False,
                            timeout=1200)
    assert result.returncode == 0, (f"{' '.join(command)} failed:\n{result.stderr}"
                                    f"\n{result.stdout[-3000:]}")
    assert (tmp_path / "html" / "generated" / "skad.PatchCore.html").is_file()
    # the executed quickstart shows its figure
    assert list((tmp_path / "html" / "_images").glob("sphx_glr_quickstart_001.png"))
