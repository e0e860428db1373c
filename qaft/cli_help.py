"""``--help`` / ``-h`` for the four command-line tools, answered from files alone: no torch, no transformers.

One convention for ``qaft-train``, ``qaft-eval``, ``qaft-export`` and ``qaft-report``: each tool's ``main`` asks
:func:`wants_help` before it imports anything heavy, and prints a page built here from what is on disk, so the page
cannot drift from the configs it describes:

* the config groups and their options are the folders and YAML files of the config tree (:func:`qaft.paths.conf_dir`);
* the experiments are those of both places Hydra searches, ``conf/experiment/`` (cluster / paper presets) and
  ``experiments/experiment/`` (one per table), named with the folder each comes from;
* the examples are the README's own command lines for that tool (the checkout's README, or the copy an installed
  wheel keeps in its metadata).

``qaft-train`` and ``qaft-eval`` are Hydra apps and keep Hydra's own flags (``--cfg job``, ``--info``, ...);
``qaft-export`` and ``qaft-report`` take ``key=value`` arguments, and refuse a Hydra flag with one line naming
``--help`` (:func:`hydra_flag`), exit 2.
"""
from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

from qaft.paths import conf_dir, experiments_dir

HELP_FLAGS = ("-h", "--help")
# Hydra's command-line flags (``python app.py --help`` lists them): meaningful for qaft-train / qaft-eval only.
HYDRA_FLAGS = ("--cfg", "-c", "--package", "-p", "--resolve", "--info", "-i", "--hydra-help", "--run", "-r",
               "--multirun", "-m", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--shell-completion", "-sc", "--experimental-rerun")
NOT_GROUPS = ("hydra",)  # folders of the config tree that are Hydra's own settings, not choices of a run


def wants_help(argv: Iterable[str]) -> bool:
    """Whether the command line asks for the help page (``-h`` or ``--help`` anywhere on it)."""
    return any(arg in HELP_FLAGS for arg in argv)


def hydra_flag(argv: Iterable[str]) -> str | None:
    """The first of Hydra's flags on a command line (``--cfg`` of ``--cfg job``; ``--cfg=job`` too), or None."""
    return next((arg for arg in argv if arg.partition("=")[0] in HYDRA_FLAGS), None)


def refuse_hydra_flag(tool: str, flag: str) -> str:
    """The one line a ``key=value`` tool answers a Hydra flag with."""
    return (f"{tool}: {flag.partition('=')[0]} is a flag of the Hydra apps (qaft-train, qaft-eval); {tool} takes "
            f"key=value arguments: see {tool} --help")


def group_options(groups: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Each config group of the tree (or of ``groups``, in that order) and its options, the YAML files' names;
    ``experiment`` has those of both folders."""
    root = conf_dir()
    names = list(groups) if groups is not None else sorted(
        d.name for d in root.iterdir() if d.is_dir() and d.name not in NOT_GROUPS and not d.name.startswith(("_", ".")))
    options = {name: sorted(p.stem for p in (root / name).glob("*.yaml")) for name in names}
    if "experiment" in options:
        options["experiment"] = sorted({name for names in experiments().values() for name in names})
    return options


def experiments() -> dict[str, list[str]]:
    """The experiment configs, by the folder they are in (both are on Hydra's search path for ``experiment=``)."""
    return {str(folder): sorted(p.stem for p in folder.glob("*.yaml"))
            for folder in (conf_dir() / "experiment", experiments_dir() / "experiment") if folder.is_dir()}


SHELL = ("bash", "sh", "shell", "")  # README code blocks whose lines are commands


def _readme_text() -> str:
    readme = conf_dir().parent / "README.md"  # a checkout's; an installed wheel's conf/ is inside the package
    if readme.is_file():
        return readme.read_text(encoding="utf-8")
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        return metadata("qaft").get("Description") or ""
    except PackageNotFoundError:
        return ""


def readme_examples(tool: str) -> list[str]:
    """The README's command lines that run ``tool`` (from its shell code blocks), each once, in README order."""
    found: list[str] = []
    fence: str | None = None  # the language of the code block we are in, None outside one
    for line in _readme_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence in SHELL and re.match(rf"{re.escape(tool)}(\s|$)", line) and line.strip() not in found:
            found.append(line.strip())  # a whole command (an indented line is part of a loop or a continuation)
    return found


def top_level_keys(config: Path, skip: Iterable[str] = ("defaults", "hydra")) -> list[str]:
    """The top-level keys of a config file, but Hydra's own (``defaults``, ``hydra``)."""
    return [m.group(1) for m in re.finditer(r"^([A-Za-z_][\w-]*):", config.read_text(), re.MULTILINE)
            if m.group(1) not in skip]


def config_body(config: Path, skip: Iterable[str] = ("defaults", "hydra")) -> list[str]:
    """A config file's keys as written, values and comments included, without its header comment and Hydra's own
    top-level blocks: what a user can set, and what each is for."""
    lines, skipping = [], True
    for line in config.read_text().splitlines():
        top = re.match(r"([A-Za-z_][\w-]*):", line)
        if top:
            skipping = top.group(1) in set(skip)
        elif not line.startswith((" ", "#")) and line.strip():
            skipping = False
        if not skipping and (lines or line.strip()) and not (top is None and not lines and line.startswith("#")):
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def wrap(text: str, width: int = 116) -> str:
    """A paragraph of prose, wrapped for a terminal."""
    return textwrap.fill(text, width)


def section(title: str, lines: Iterable[str]) -> str:
    """A titled block of indented lines (empty string when there are none)."""
    lines = list(lines)
    return f"{title}:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def examples_section(tool: str) -> str:
    return section("Examples (from the README)", readme_examples(tool))


def groups_section(options: dict[str, list[str]]) -> str:
    width = max((len(g) for g in options), default=0)
    return section("Config groups (group=option)", (f"{g:<{width}}  {', '.join(o)}" for g, o in options.items()))


def experiments_section() -> str:
    root = conf_dir().parent
    lines = []
    for folder, names in experiments().items():
        shown = Path(folder).relative_to(root) if Path(folder).is_relative_to(root) else Path(folder)
        lines.append(f"{str(shown) + '/':<24} {', '.join(names)}")
    return section("Experiments (experiment=NAME; -m experiment=NAME for a table's sweep)", lines)


def page(*parts: str) -> str:
    """The help page: its non-empty parts, a blank line apart."""
    return "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


__all__ = ["HELP_FLAGS", "HYDRA_FLAGS", "examples_section", "experiments", "experiments_section", "group_options",
           "groups_section", "hydra_flag", "page", "readme_examples", "refuse_hydra_flag", "section", "top_level_keys",
           "wants_help", "wrap"]
