"""``hookproxy new-plugin NAME``: a complete plugin package to start from — pyproject.toml
with the entry point, the plugin module, a README and a test that passes as written
(through ``proxy.testing``'s ``hookproxy`` fixture)."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

# A plugin's name is its entry point's name and its key in config.toml.
NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")

_PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A hookproxy plugin: $name"
requires-python = ">=3.11"
dependencies = ["hookproxy"]

[project.optional-dependencies]
# proxy.testing's SDK clients and the `hookproxy` pytest fixture.
test = ["hookproxy[testing]"]

# The entry point's name is the plugin's name in config.toml: [plugins.$name]
[project.entry-points."hookproxy.plugins"]
$name = "$module"

[tool.setuptools]
py-modules = ["$module"]
''')

_MODULE = Template('''\
"""$name: a hookproxy plugin.

    [plugins.$name]
    header = "x-$name"     # the response header that tells the client how many messages it sent
"""

from __future__ import annotations

from typing import Any

import msgspec

from proxy import RequestContext, hookimpl
from proxy.settings import settings_as, settings_error


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    header: str = "x-$name"


@hookimpl
def validate_settings(settings: dict[str, Any]) -> str | None:
    # Checked once at startup: a typo in [plugins.$name] stops `hookproxy serve`.
    return settings_error(settings, Settings)


@hookimpl
def request_start(ctx: RequestContext, settings: dict[str, Any]) -> None:
    config = settings_as(settings, Settings)
    count = len(ctx.request.messages)
    ctx.response_headers[config.header] = str(count)  # on the client's answer
    ctx.annotate("messages", count)                   # in the record and the dashboard
    ctx.log.info("$name counted the messages", messages=count)
''')

_TEST = Template('''\
"""Runs hookproxy with this plugin in front of a fake provider, and asks it through the
official SDKs (the `hookproxy` fixture comes with hookproxy: proxy.testing)."""

import pytest

from proxy.config import ConfigError

HELLO = [{"role": "user", "content": "hello"}]


def test_it_tells_both_sdks_how_many_messages_they_sent(hookproxy):
    proxy = hookproxy(settings={"$name": {}})  # switched on through its entry point
    raw = proxy.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=HELLO)
    assert raw.headers["x-$name"] == "1"
    assert raw.parse().choices[0].message.content == "echo: hello"

    raw = proxy.anthropic().messages.with_raw_response.create(
        model="claude-fake", max_tokens=50, messages=HELLO * 3)
    assert raw.headers["x-$name"] == "3"
    assert proxy.provider.last["messages"] == HELLO * 3  # the provider got the request
    assert proxy.settled()[-1].annotations == {"$name": {"messages": 3}}


def test_a_mistyped_setting_is_refused(hookproxy):
    with pytest.raises(ConfigError, match="$name"):
        hookproxy(settings={"$name": {"headr": "x-typo"}})
''')

_README = Template('''\
# $dist

A [hookproxy](https://pypi.org/project/hookproxy/) plugin.

```sh
pip install -e '.[test]'   # the plugin, hookproxy, and what its tests need
pytest                     # runs hookproxy with the plugin in front of a fake provider
hookproxy plugins          # lists `$name`
```

Switch it on in hookproxy's `config.toml`:

```toml
[plugins.$name]
header = "x-$name"
```
''')


def new_plugin(name: str, where: Path) -> Path:
    """Writes the package for plugin ``name`` into ``where/hookproxy-NAME``; returns that
    folder. Raises ``ValueError`` for a name that cannot be a plugin's, ``FileExistsError``
    when the folder exists."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{name!r} cannot be a plugin name: use lower-case letters, digits, "
                         "'-' and '_', starting with a letter (at most 40)")
    dist = f"hookproxy-{name}"
    module = f"hookproxy_{name.replace('-', '_')}"
    folder = where / dist
    folder.mkdir(parents=True)  # FileExistsError: never over an existing folder
    values = {"name": name, "dist": dist, "module": module}
    (folder / "tests").mkdir()
    for path, template in ((folder / "pyproject.toml", _PYPROJECT),
                           (folder / f"{module}.py", _MODULE),
                           (folder / "tests" / f"test_{module}.py", _TEST),
                           (folder / "README.md", _README)):
        path.write_text(template.substitute(values), encoding="utf-8")
    return folder
