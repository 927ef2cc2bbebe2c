"""Installed as users install it: the sdist and wheel built from the checkout, installed into
a fresh virtual environment outside it (with the example plugin package beside it, not
editable), and run from an empty folder."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def _run(*command: str | Path, cwd: Path | None = None, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True,
                            text=True, timeout=540)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel from the sdist: both must hold what the program needs.
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("venv") / "env"
    _run(sys.executable, "-m", "venv", where)
    wheel = next(dist.glob("hookproxy-*.whl"))
    # A copy, so that building it leaves nothing behind in the checkout.
    example = shutil.copytree(ROOT / "examples" / "hookproxy-example", where.parent / "example",
                              ignore=shutil.ignore_patterns("*.egg-info", "build"))
    # Non-editable, as `pip install hookproxy` and a plugin package that depends on it do.
    _run(where / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, example)
    return where


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(venv: Path, folder: Path) -> tuple[str, subprocess.Popen[str]]:
    """``hookproxy serve`` started in ``folder``, once it answers /health."""
    port = _free_port()
    process = subprocess.Popen([str(venv / "bin" / "hookproxy"), "serve", "--port", str(port)],
                               cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                assert response.status == 200
                return url, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0]
                raise AssertionError(f"hookproxy serve did not start:\n{output}") from None
            time.sleep(0.1)


@pytest.fixture
def served(venv: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    """Started from an empty folder, with no config file anywhere near it."""
    folder = tmp_path / "empty"
    folder.mkdir()
    url, process = _serve(venv, folder)
    try:
        yield url, process, folder
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=15)


def test_distributions_carry_the_dashboard_and_configs(dist: Path) -> None:
    wheel = next(dist.glob("hookproxy-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("proxy/static/index.html", "proxy/static/dashboard.js",
                 "proxy/static/dashboard.css", "proxy/starter.toml", "proxy/default.toml"):
        assert name in names, f"{name} is not in {wheel.name}"
    assert not any(n.startswith(("tests/", "static/", "bench/")) for n in names)
    assert next(dist.glob("hookproxy-*.tar.gz"))


def test_starter_config_is_the_shipped_one() -> None:
    # `hookproxy init` writes proxy/starter.toml; the repository's config.toml is its copy.
    assert (ROOT / "proxy" / "starter.toml").read_text() == (ROOT / "config.toml").read_text()


def test_wheel_serves_from_an_empty_folder(served) -> None:
    url, process, folder = served
    with urllib.request.urlopen(f"{url}/health") as response:
        health = response.read().decode()
    assert '"mock"' in health
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "Hello from a wheel"}])
    assert reply.choices[0].message.content
    assert "Hello from a wheel" in reply.choices[0].message.content

    with urllib.request.urlopen(f"{url}/dashboard") as response:
        assert response.headers["content-type"].startswith("text/html")
        page = response.read().decode()
    assets = re.findall(r'(?:href|src)="(/dashboard/static/[^"]+)"', page)
    assert {a.rsplit(".", 1)[1] for a in assets} == {"css", "js"}
    expected = {"css": "text/css", "js": "text/javascript"}
    for asset in assets:
        with urllib.request.urlopen(f"{url}{asset}") as response:
            assert response.status == 200
            assert response.headers["content-type"].startswith(expected[asset.rsplit(".")[1]])
            assert len(response.read()) > 100

    # The built-in default logs beside where it was started, as the starter config does.
    deadline = time.monotonic() + 10
    log = folder / "logs" / "requests.jsonl"
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "mock-1" in log.read_text()

    process.terminate()
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert "built-in default" in output and "hookproxy init" in output


def test_init_check_and_version_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    hookproxy = venv / "bin" / "hookproxy"
    assert _run(hookproxy, "--version").stdout.strip() == "hookproxy 0.1.0"
    written = _run(hookproxy, "init", cwd=tmp_path)
    assert "config.toml" in written.stdout
    assert (tmp_path / "config.toml").read_text() == (ROOT / "config.toml").read_text()
    refused = _run(hookproxy, "init", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    other = tmp_path / "elsewhere.toml"
    _run(hookproxy, "init", other)
    checked = _run(hookproxy, "check", "--config", other)
    assert "OK" in checked.stdout and "mock-1" in checked.stdout
    # Found without --config, as ./config.toml.
    assert "config.toml: OK" in _run(hookproxy, "check", cwd=tmp_path).stdout
    missing = _run(hookproxy, "check", "--config", tmp_path / "nope.toml", check=False)
    assert missing.returncode == 2 and "nope.toml: file not found" in missing.stderr
    missing = _run(hookproxy, "serve", "--config", tmp_path / "nope.toml", check=False)
    assert missing.returncode == 2 and "nope.toml: file not found" in missing.stderr


def test_example_package_beside_the_wheel(venv: Path, tmp_path: Path) -> None:
    hookproxy = venv / "bin" / "hookproxy"
    listed = _run(hookproxy, "plugins", cwd=tmp_path).stdout
    line = next(x for x in listed.splitlines() if x.startswith("example "))
    assert "hookproxy-example" in line and "request_start" in line
    config = tmp_path / "config.toml"
    config.write_text(
        (ROOT / "proxy" / "default.toml").read_text()
        + '\n[plugins.example]\nblocked = ["launch codes"]\n')
    assert "plugins enabled: example" in _run(hookproxy, "check", cwd=tmp_path).stdout
    url, process = _serve(venv, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="mock-1", messages=[{"role": "user", "content": "ping"}])
        assert reply.choices[0].message.content == "pong"
        with pytest.raises(openai.PermissionDeniedError, match="launch codes"):
            client.chat.completions.create(
                model="mock-1", messages=[{"role": "user", "content": "the launch codes?"}])
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_plugin_authors_test_against_the_wheel(venv: Path, dist: Path, tmp_path: Path) -> None:
    """proxy.testing and the `hookproxy` pytest fixture from an installed wheel: the example
    package's tests, and a package `hookproxy new-plugin` writes, installed as users do."""
    wheel = next(dist.glob("hookproxy-*.whl"))
    _run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check",
         f"{wheel}[testing]")
    example = venv.parent / "example"  # the copy the venv fixture installed
    tested = _run(venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  example / "tests", cwd=tmp_path)
    assert " passed" in tested.stdout and "failed" not in tested.stdout
    _run(venv / "bin" / "hookproxy", "new-plugin", "tally", cwd=tmp_path)
    package = tmp_path / "hookproxy-tally"
    _run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", package)
    listed = _run(venv / "bin" / "hookproxy", "plugins", cwd=tmp_path).stdout
    assert any(line.startswith("tally ") and "hookproxy-tally" in line
               for line in listed.splitlines())
    tested = _run(venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests", cwd=package)
    assert "2 passed" in tested.stdout
