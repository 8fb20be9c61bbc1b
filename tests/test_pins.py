"""Docker images cannot be built here (no Docker engine): parse the Dockerfiles (dockerfile-parse)
and check that they pin what `make install` pins, keep their layers cache-friendly, run as a
non-root user that TorchX can start any command as, and copy what the image needs."""

import io
import re
import tomllib

import pytest
from dockerfile_parse import DockerfileParser

from tests.helpers.runs import ROOT

DOCKERFILES = {"cpu": ROOT / "docker/Dockerfile.cpu", "gpu": ROOT / "docker/Dockerfile"}
TRIPLE = {"torch": "2.13.0", "torchrec": "1.8.0"}
FBGEMM = {"cpu": "fbgemm-gpu-cpu", "gpu": "fbgemm-gpu"}
# The CUDA builds torch 2.13 and fbgemm-gpu 1.8.0 are published for (no cu128 since torch 2.12).
CUDA_BUILDS = {"cu126": "12.6", "cu130": "13.0"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
"""The top-level packages the wheel holds (their sub-packages come with them)."""


def instructions(kind: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) in order, comments left out, line continuations joined."""
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[kind].read_bytes()))
    return [(i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"]


def parser_of(kind: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[kind].read_bytes()))


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", text))


def pip_installs(kind: str) -> list[str]:
    """Every `pip install ...` command of the RUN instructions."""
    return [
        cmd.strip()
        for op, value in instructions(kind)
        if op == "RUN"
        for cmd in re.split(r"&&|;", value)
        if "pip install" in cmd
    ]


def test_dockerfiles_and_makefile_pin_the_same_triple():
    makefile = (ROOT / "Makefile").read_text()
    make_pins = pins(makefile)
    for kind, path in DOCKERFILES.items():
        text = path.read_text()
        image_pins = pins(text)
        for package, version in {**TRIPLE, FBGEMM[kind]: "1.8.0"}.items():
            assert image_pins.get(package) == version, (path.name, package)
        assert "--no-deps torchrec" in text, path.name
        # whatever both pin, they pin alike; the unpinned helpers are the same set
        assert {p: v for p, v in image_pins.items() if p in make_pins} == {
            p: v for p, v in make_pins.items() if p in image_pins
        }
        assert any(c.endswith("pyre-extensions tensordict iopath") for c in pip_installs(kind)), path.name
    assert make_pins.get("torchrec") == TRIPLE["torchrec"] and "--no-deps torchrec" in makefile
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert pins(" ".join(extras["cpu"])) == {"torch": TRIPLE["torch"], "fbgemm-gpu-cpu": "1.8.0"}
    assert {"pyre-extensions", "tensordict", "iopath"} <= set(extras["cpu"])  # torchrec's, as it has --no-deps
    assert pins(" ".join(extras["gpu"])) == {**TRIPLE, "fbgemm-gpu": "1.8.0"}
    assert "torchmetrics==1.0.3" in PYPROJECT["project"]["dependencies"] and "torchx==0.7.0" in extras["launch"]


def test_optional_features_are_extras_and_the_base_install_is_lean():
    """tensorboard, MLflow/W&B, s3fs, optuna, matplotlib and torchx come with the extras that use
    them ([all] has every one, [test] has [all]); the base dependencies hold none of them."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    base = " ".join(PYPROJECT["project"]["dependencies"])
    for extra, package in [("tensorboard", "tensorboard"), ("tracking", "mlflow-skinny"), ("s3", "s3fs"),
                           ("tune", "optuna"), ("report", "matplotlib"), ("launch", "torchx")]:  # fmt: skip
        assert any(d.startswith(package) for d in extras[extra]), extra
        assert package not in base, package
    assert extras["all"] == ["recsys-trainer[tracking,s3,tune,report,launch]"]
    assert "recsys-trainer[all]" in extras["test"] and "recsys-trainer[tensorboard]" in extras["tracking"]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_installs_the_project_dependencies_from_pyproject(kind):
    """The images install pyproject's own dependency list (not a copy of it that could drift), in
    a layer that only pyproject.toml invalidates; the project itself goes in with --no-deps."""
    steps = instructions(kind)
    copy_pyproject = steps.index(("COPY", "pyproject.toml ./"))
    install_deps = next(
        i for i, (op, value) in enumerate(steps) if op == "RUN" and "['project']['dependencies']" in value
    )
    first_source = next(i for i, (op, value) in enumerate(steps) if op == "COPY" and value.split()[0] in PACKAGES)
    assert copy_pyproject < install_deps < first_source
    assert "pip install --no-cache-dir -r /tmp/requirements.txt" in steps[install_deps][1]
    assert any(re.fullmatch(r"pip install --no-cache-dir --no-deps -e \.", c) for c in pip_installs(kind))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_layers_are_small_and_cache_friendly(kind):
    steps = instructions(kind)
    assert [op for op, _ in steps].count("FROM") == 1
    torch_layer = next(
        i for i, (op, value) in enumerate(steps) if op == "RUN" and "torch==2.13.0" in value and "pip install" in value
    )
    assert all(op != "COPY" for op, _ in steps[:torch_layer])  # no source change rebuilds the torch layer
    for command in pip_installs(kind):
        assert "--no-cache-dir" in command, command
    for op, value in steps:
        assert not (op in ("COPY", "ADD") and value.split()[0] in (".", "./")), "copies the whole build context"
        if op == "RUN" and "apt-get install" in value:
            assert "--no-install-recommends" in value and "rm -rf /var/lib/apt/lists/*" in value
    # later installs cannot swap the torch build (tensordict, torchmetrics depend on torch)
    assert parser_of(kind).envs["PIP_CONSTRAINT"] == "/etc/pip-constraints.txt"
    assert 'echo "torch==2.13.0" > /etc/pip-constraints.txt' in steps[torch_layer][1]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_runs_as_non_root_without_entrypoint(kind):
    steps = instructions(kind)
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users, "no USER: the image would run as root"
    last_user = steps[users[-1]][1].split(":")[0]
    assert last_user not in ("root", "0")
    assert all(op != "RUN" for op, _ in steps[users[-1] :])  # nothing after it runs as root again
    assert any(op == "RUN" and re.search(rf"useradd .*\b{last_user}$", value) for op, value in steps)
    # TorchX (local_docker, kubernetes) starts `bash -c "torchrun ..."` as the container command:
    # an ENTRYPOINT would be put in front of it
    assert all(op != "ENTRYPOINT" for op, _ in steps)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_copies_what_the_image_needs(kind):
    copied = []
    for op, value in instructions(kind):
        if op in ("COPY", "ADD"):
            *sources, _ = value.split()
            copied += [s for s in sources if not s.startswith("--")]
    for source in copied:
        assert (ROOT / source).exists(), source
    needed = {"pyproject.toml", "README.md", *PACKAGES}  # the presets come with launch/ (configs/ links there)
    assert needed <= set(copied), needed - set(copied)
    assert any(op == "RUN" and "ln -s launch/configs configs" in value for op, value in instructions(kind))
    assert PYPROJECT["project"]["readme"] in copied  # setuptools reads it when installing


def test_gpu_image_cuda_matches_its_wheel_index():
    parser = parser_of("gpu")
    base = parser.baseimage  # ARG defaults substituted
    cu = parser.args["CU"]
    assert cu in CUDA_BUILDS, f"torch 2.13 / fbgemm-gpu 1.8.0 publish {sorted(CUDA_BUILDS)}, not {cu}"
    assert re.fullmatch(
        rf"nvidia/cuda:{re.escape(CUDA_BUILDS[cu])}\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.04", base
    ), base
    index = "--index-url https://download.pytorch.org/whl/${CU}"
    installs = pip_installs("gpu")
    assert any(c.startswith("pip install --no-cache-dir torch==2.13.0") and c.endswith(index) for c in installs)
    assert any(c.startswith("pip install --no-cache-dir fbgemm-gpu==1.8.0") and c.endswith(index) for c in installs)
    assert any(
        c.endswith("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu") for c in pip_installs("cpu")
    )


def test_test_and_lint_dependencies_are_installed_by_make():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("dockerfile-parse") for d in extras["test"])
    assert any(d.startswith("ruff==") for d in extras["lint"])  # pinned: formatting differs across releases
    install = [line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line and "-e" in line]
    assert any('-e ".[cpu,test,lint]"' in line for line in install), install


def test_the_lock_satisfies_pyprojects_requirements():
    """constraints.txt (make install's lock) pins every package it names once, and each of
    pyproject's requirements that make install asks for is met by the locked version: a
    requirement changed without `make lock` fails here, not in CI's install."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    locked = {}
    for line in lines:
        name, version = line.split("==")
        assert canonicalize_name(name) not in locked, name
        locked[canonicalize_name(name)] = version
    extras = PYPROJECT["project"]["optional-dependencies"]
    requirements = PYPROJECT["project"]["dependencies"] + [
        r for extra in ("cpu", "test", "lint", "all", "tracking", "tensorboard", "s3", "tune", "report", "launch")
        for r in extras[extra] if not r.startswith("recsys-trainer")
    ]  # fmt: skip
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in constraints.txt (run make lock)"
        assert requirement.specifier.contains(locked[name], prereleases=True), (text, locked[name])
    assert "torchrec" not in locked  # installed with --no-deps after the lock (see the Makefile)
