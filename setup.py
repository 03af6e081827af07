"""Installs the fork as the `transformers` package: the pinned pristine release plus patches/, assembled in src/.

`pip install -e .` on a fresh clone fetches the release pinned in upstream.toml (with pip, by package name, checked by
sha256), applies patches/series to make src/transformers, and installs it in editable mode, so `import transformers`
resolves into this checkout. The version is the release's plus the fork's local label
(patches/*-fork-version-label.patch).
"""

import re
import sys
from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "utils"))
import patchq  # noqa: E402  (the fork's own patch-queue tool, standard library only)


def assembled_version() -> str:
    init = (ROOT / "src" / "transformers" / "__init__.py").read_text(encoding="utf-8")
    release = re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1)
    labels = re.findall(r'^__version__ \+= "([^"]+)"', init, re.M)
    return release + "".join(labels)


def upstream_metadata(pristine: Path, field: str) -> list[str]:
    """Values of one field of the release's own sdist metadata (PKG-INFO)."""
    metadata = (pristine / "PKG-INFO").read_text(encoding="utf-8")
    return [value.strip() for value in re.findall(rf"^{field}: (.+)$", metadata, re.M)]


try:
    patchq.assemble(ROOT, quiet=True)
    pristine = patchq.fetch(ROOT)
except patchq.PatchQueueError as e:
    sys.exit(f"transformers (EP + DeepSpeed fork): cannot assemble src/transformers: {e}")

setup(
    name="transformers",
    version=assembled_version(),
    description="transformers with expert parallelism under DeepSpeed ZeRO-3 (patch queue on the pinned release)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache 2.0 License",
    package_dir={"": "src"},
    packages=find_packages("src", include=["transformers", "transformers.*"]),
    include_package_data=True,
    package_data={"": ["**/*.cu", "**/*.cpp", "**/*.cuh", "**/*.h", "**/*.pyx", "py.typed"]},
    zip_safe=False,
    python_requires=upstream_metadata(pristine, "Requires-Python")[0],
    # The release's hard dependencies (its extras are left out: the Makefile installs the pinned training stack).
    install_requires=[r for r in upstream_metadata(pristine, "Requires-Dist") if "extra ==" not in r],
    entry_points={"console_scripts": ["transformers=transformers.cli.transformers:main"]},
)
