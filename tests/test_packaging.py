"""The wheel is what a user installs: built from the repository, installed outside the source tree, it holds
the package, its shipped weights and configs, and its command runs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_outside_the_source_tree_and_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("egrpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"egrpo/assets/digits_base.safetensors", "egrpo/configs/flux-dev-hps.yaml"} <= set(names)
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    # The installed copy, not this checkout (its dependencies come from the running environment).
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def egrpo(*args):
        return subprocess.run([sys.executable, "-m", "egrpo", *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, check=True).stdout

    where = subprocess.run([sys.executable, "-c", "import egrpo; print(egrpo.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    assert egrpo("--version").strip() == "egrpo 0.1.0"
    assert "merge_lengths: [1, 1, 2, 2, 2, 3, 3, 3]" in egrpo("plan")
    assert "kind: flux" in egrpo("config", "flux-dev-hps")
