"""The README's Python example runs as written."""
import re

from helpers import ROOT

README = ROOT / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- ci:example -->\n```python\n(.*?)```\n<!-- /ci:example -->", text, re.S)
    assert block, "README lost its example block"
    exec(compile(block.group(1), str(README), "exec"), {})


def _train_commands(path) -> list[str]:
    """The ``qaft-train ...`` lines of a markdown file's shell blocks (without comments)."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("qaft-train ")]


def test_readme_train_commands_parse_and_compose():
    """Each qaft-train line as the shell gives it to Hydra: its flags in a place Hydra's parser accepts (``-m``
    before the overrides: argparse takes no flag after them), and its first sweep job composes."""
    import shlex

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from qaft.training.cli import CONF_DIR
    from qaft.training.config import register_conf

    register_conf()
    commands = _train_commands(README) + _train_commands(ROOT / "experiments" / "README.md")
    assert any("hydra/launcher=slurm" in c for c in commands), "the SLURM line is gone"
    for command in commands:
        args = get_args_parser().parse_args(shlex.split(command)[1:])
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        (first, *_), *_ = BasicSweeper.split_arguments(parsed, None)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=first, return_hydra_config=True)
        assert cfg.method.name, command


def test_readme_exactness_table_is_the_generated_one():
    """The deploy section's table of which methods export exactly to which format is ``python -m
    qaft.deploy.exactness``'s, so it follows the methods' traits."""
    from qaft.deploy.exactness import exactness_table

    block = re.search(r"<!-- exactness-table: python -m qaft.deploy.exactness -->\n(.*?)\n<!-- /exactness-table -->",
                      README.read_text(), re.DOTALL)
    assert block, "README lost its exactness table"
    assert block.group(1) == exactness_table(), "regenerate it: python -m qaft.deploy.exactness"
