"""The README and docs/ against the code (pure: no etcd, no root): every link leads somewhere,
every `l3netctl` and `l3net-plugin` command and option they show exists, every `L3NET_*`
variable they name is read somewhere, every `make` target exists. A renamed flag or a moved
section fails here, not in a user's shell."""

import os
import re

import click
import pytest

from plugin.cli import cli
from plugin.server import main as plugin_main
from tests.conftest import ROOT

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
CODE_DIRS = ["plugin", "ipam", "core", "scripts", "tests", "contrib", "examples"]
CODE_FILES = ["Makefile", "plugin.json", "Dockerfile", ".ci/run"]


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def code_text(path):
    """What the document shows as commands: fenced blocks and inline code."""
    text = read(path)
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return blocks + inline


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_leads_somewhere(doc):
    text = read(doc)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue                                    # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, resolved)):
            bad.append(f"{target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            bad.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not bad, bad


def walk(group, words):
    """The click command ``words`` name under ``group`` and the options in force along the way
    (a group's options count for its subcommands' lines), or (None, word) for an unknown one."""
    command, options = group, set()
    for word in words:
        options |= {o for p in command.params for o in p.opts + p.secondary_opts}
        if not isinstance(command, click.Group):
            break
        sub = command.commands.get(word)
        if sub is None:
            if word.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            return None, word
        command = sub
    options |= {o for p in command.params for o in p.opts + p.secondary_opts}
    return command, options | {"--help", "-h"}


def command_lines(program):
    """(doc, words) of every shown invocation of ``program``."""
    out = []
    for doc in DOCS:
        for text in code_text(doc):
            for m in re.finditer(rf"(?:^|[\s;&|(]){re.escape(program)}((?:[ \t]+[^\s|;&#)`]+)*)", text, re.M):
                words = [w for w in m.group(1).split() if w != "\\"]
                out.append((doc, words))
    return out


def test_every_l3netctl_command_and_option_shown_exists():
    lines = command_lines("l3netctl")
    assert len(lines) > 30, "the docs show l3netctl commands"
    bad = []
    for doc, words in lines:
        if not words:
            continue
        command, options = walk(cli, words)
        if command is None:
            bad.append(f"{doc}: l3netctl {' '.join(words)}: no command {options!r}")
            continue
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and re.fullmatch(r"--[a-z][a-z0-9-]*", flag) and flag not in options:
                bad.append(f"{doc}: l3netctl {' '.join(words)}: no option {flag}")
    assert not bad, "\n".join(bad)


def test_every_l3net_plugin_option_shown_exists():
    options = {o for p in plugin_main.params for o in p.opts + p.secondary_opts} | {"--help", "-h"}
    bad = []
    for doc, words in command_lines("l3net-plugin"):
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and re.fullmatch(r"--[a-z][a-z0-9-]*", flag) and flag not in options:
                bad.append(f"{doc}: l3net-plugin {' '.join(words)}: no option {flag}")
    # and the configuration table names its options: | `--state-dir` | `L3NET_STATE_DIR` |
    rows = re.findall(r"^\| `(--[a-z][a-z0-9-]*)", read("docs/configuration.md"), re.M)
    assert len(rows) > 10
    for flag in rows:
        if flag not in options and flag not in walk(cli, [])[1]:
            bad.append(f"docs/configuration.md: table row {flag}: neither l3net-plugin's nor l3netctl's option")
    assert not bad, "\n".join(bad)


def code_corpus():
    parts = [read(f) for f in CODE_FILES if os.path.exists(os.path.join(ROOT, f))]
    for d in CODE_DIRS:
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            parts += [read(os.path.relpath(os.path.join(base, f), ROOT)) for f in files
                      if f.endswith((".py", ".sh", ".yml", ".service", ".json")) or "." not in f]
    return "\n".join(parts)


def test_every_l3net_variable_named_is_read_somewhere():
    corpus = code_corpus()
    bad = []
    for doc in DOCS:
        for name in sorted(set(re.findall(r"\bL3NET_[A-Z0-9_]*[A-Z0-9]\b", read(doc)))):
            if not re.search(rf"\b{name}\b", corpus):
                bad.append(f"{doc}: {name}")
    assert not bad, bad


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", read("Makefile"), re.M))
    bad = []
    for doc in DOCS:
        for text in code_text(doc):
            for target in re.findall(r"(?:^|&&|;|\(|^`)[ \t]*make ([a-z][a-z-]*)\b", text, re.M):
                if target not in targets:
                    bad.append(f"{doc}: make {target}")
    assert not bad, bad


def test_the_readme_stays_a_start():
    """The README starts a newcomer; the manual is in docs/."""
    assert len(read("README.md").splitlines()) <= 300
