"""Known third-party noise, dropped by exact message, so that a run's log starts with qaft's own first line.

A researcher reading a SLURM log learns to skip warnings that say nothing about the run, and then skips the one
that does. So each line silenced here is named by its logger (or warning category and module) and matched in
full; anything else, including a new message from the same library, still shows.

Two scopes:

* :func:`quiet_imports`, around the imports of ``qaft.models`` and of the attributes of ``qaft`` and
  ``qaft.deploy`` (:mod:`qaft.lazy`): transformers' ``quantizers`` package imports torchao whenever it is
  installed (``quantizer_torchao`` does it at module level), and ``modeling_utils`` imports that package,
  so every process that builds a model imports torchao, writing a torchao format or not. torchao's import logs
  that its optional CUDA / MX kernel libraries did not load and registers two enums the way torch now deprecates.
  Neither says anything about a run, and torchao is imported once per process, so the filters are removed again
  after the imports: importing qaft as a library leaves logging as it found it.
* :func:`silence_third_party_noise`, called by each command-line tool when its module loads: the lines a run
  prints later (Lightning's litlogger advertisement and its own use of a deprecated torch class; bitsandbytes'
  optional CPU kernel, fetched from the Hub when something imports it). These filters stay for the process: the
  tools own it. (transformers' warning about a packed folder's stub ``config.json`` is not filtered: qaft reads the
  tokenizer beside it with the folder's real config, :func:`qaft.deploy.packed.load_folder_tokenizer`.)
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# (logger, regular expression the whole rendered message must match)
IMPORT_NOISE: tuple[tuple[str, str], ...] = (
    # torchao's optional kernels: MX formats (built for another Python here) and sm90a CUTLASS ones; qaft's
    # format=hf layers (IntxUnpackedToInt8Tensor) use neither.
    ("torchao", r"Failed to load \S+/torchao/_C_(?:mxfp8\.cpython-\d+-[\w-]+|cutlass_90a\.abi3)\.so: .*"),
    ("torch.utils._pytree", r"<enum '(?:KernelPreference|ScaleCalculationMode)'> " + re.escape(
        "is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling "
        "register_constant() on Enum subclasses is deprecated and will be an error in a future release.")),
)
RUN_NOISE: tuple[tuple[str, str], ...] = (
    ("pytorch_lightning.utilities.rank_zero", re.escape(
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts "
        "automatically to the Lightning Experiments platform.")),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: .*" + re.escape(
        ". Please make sure you already `pip install kernels` and the kernels >= 0.11.1")),
    ("kernels._internals.hf_hub", re.escape(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
        "Hub is in offline mode.")),
)
# (category, module that warns, regular expression the whole message must match)
RUN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # Lightning 2.6 builds torch's LeafSpec itself; the deprecation is Lightning's to act on.
    (FutureWarning, "pytorch_lightning.utilities._pytree", re.escape(
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
        "treespec.is_leaf()` instead.")),
)


class DropExact(logging.Filter):
    """A logger filter that drops records whose rendered message matches one of ``patterns`` in full."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p, re.DOTALL) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record is the handler's to report, not a filter's to raise
            return True
        return not any(p.fullmatch(message) for p in self.patterns)


def _by_logger(noise: tuple[tuple[str, str], ...]) -> dict[str, DropExact]:
    patterns: dict[str, list[str]] = {}
    for logger, pattern in noise:
        patterns.setdefault(logger, []).append(pattern)
    return {logger: DropExact(p) for logger, p in patterns.items()}


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Drop :data:`IMPORT_NOISE` while the block runs (the imports that first load torchao)."""
    filters = _by_logger(IMPORT_NOISE)
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)  # a filter on a logger not yet used waits for its library
    try:
        yield
    finally:
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)


_installed = False


def silence_third_party_noise() -> None:
    """Drop the known lines of :data:`IMPORT_NOISE`, :data:`RUN_NOISE` and :data:`RUN_WARNINGS` for the rest of
    the process (once; a second call does nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, f in _by_logger(IMPORT_NOISE + RUN_NOISE).items():
        logging.getLogger(name).addFilter(f)
    ignore_known_warnings()


def ignore_known_warnings() -> None:
    """Put an ``ignore`` filter for each of :data:`RUN_WARNINGS` at the front of the warnings filters."""
    for category, module, message in RUN_WARNINGS:
        # warnings match the message and the module name from their start only: \Z makes both whole.
        warnings.filterwarnings("ignore", message=message + r"\Z", category=category, module=re.escape(module) + r"\Z")


__all__ = ["IMPORT_NOISE", "RUN_NOISE", "RUN_WARNINGS", "DropExact", "ignore_known_warnings", "quiet_imports",
           "silence_third_party_noise"]
