"""`pip install -e .` installs this checkout as `transformers`: the fork's version, code resolved from src/."""

import importlib.metadata
import re
import subprocess
import tomllib
import unittest
from pathlib import Path

import transformers


REPO_ROOT = Path(__file__).resolve().parents[2]


def pinned_release() -> str:
    """The upstream release the fork is assembled from (upstream.toml), so that a rebase needs no test edit."""
    with open(REPO_ROOT / "upstream.toml", "rb") as f:
        return tomllib.load(f)["version"]


class InstallTest(unittest.TestCase):
    def test_import_resolves_into_this_checkout_with_the_fork_version(self):
        self.assertEqual(Path(transformers.__file__).resolve(), REPO_ROOT / "src" / "transformers" / "__init__.py")
        (patch,) = (REPO_ROOT / "patches").glob("*-fork-version-label.patch")
        label = re.search(r'__version__ \+= "\+(ep\.\d+)"', patch.read_text())
        self.assertEqual(transformers.__version__, f"{pinned_release()}+{label.group(1)}")
        self.assertEqual(importlib.metadata.version("transformers"), transformers.__version__)

    def test_no_second_copy_of_upstream_in_site_packages(self):
        dist = importlib.metadata.distribution("transformers")
        installed = [str(f) for f in dist.files or []]
        self.assertFalse([f for f in installed if f.endswith(".py") and f.startswith("transformers/")], installed)
        site = Path(dist.locate_file(""))
        self.assertFalse((site / "transformers").exists(), f"a copy of the package sits in {site}")

    def test_fork_runtime_requirements_are_upstreams(self):
        requires = importlib.metadata.requires("transformers")
        for name in ("huggingface-hub", "safetensors", "tokenizers", "numpy"):
            self.assertTrue(any(r.startswith(name) for r in requires), requires)

    def test_second_install_is_a_no_op(self):
        # `make test` twice reuses the environment: the install stamp is up to date.
        proc = subprocess.run(["make", "-q", "install"], cwd=REPO_ROOT, capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, "make install would run again although nothing changed")
