"""Docker images cannot be built here: check that they pin what `make install` pins."""

import re

from tests.conftest import ROOT

PINS = ("torch==2.13.0", "torchrec==1.8.0")


def test_dockerfiles_and_makefile_pin_the_same_triple():
    makefile = (ROOT / "Makefile").read_text()
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        for pin in PINS:
            assert pin in text and pin in makefile, (name, pin)
        assert "--no-deps torchrec" in text
    assert "fbgemm-gpu-cpu==1.8.0" in makefile and "fbgemm-gpu-cpu==1.8.0" in (ROOT / "docker/Dockerfile.cpu").read_text()
    assert re.search(r"fbgemm-gpu==1\.8\.0", (ROOT / "docker/Dockerfile.gpu").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "torchmetrics==1.0.3" in pyproject
