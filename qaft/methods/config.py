"""Method configs: one dataclass per method, registered by name, validated at construction.

Field sets are composed from small mixins so that ``config_for(name, **fields)`` accepts exactly the fields
that apply to a method (``bits``, ``group_size``, ``rank``, ``alpha``, ``init``, ``target_modules``,
``zero_point``, ``warmup_steps``, ``quant_steps``, ``loftq_iters``, GPTQ's ``calib_batches`` / ``act_order`` /
``percdamp``, ...) and rejects the rest with a ``ValueError``.

A config builds its layers one at a time (:meth:`MethodConfig.make_layer`), unless it needs calibration data:
then :meth:`MethodConfig.calibration_options` returns its GPTQ options and :meth:`MethodConfig.apply_calibrated`
converts the whole model from the batches (``qaft.apply_method(model, config, calib_batches=...)`` calls it).
A method trained by distillation from the frozen float model (LLM-QAT) says so with :meth:`MethodConfig.teacher`.

What a method *is* (merges to integer or float layers, bit for bit or to float rounding, what trains, ...) is its
:class:`MethodTraits`, declared once on the config class as ``traits = MethodTraits(...)``; the traits the class
itself implies (an adapter from :class:`LoRAFields`, a teacher from overriding :meth:`MethodConfig.teacher`, ...)
are filled in by :func:`register`, so they cannot disagree with the code. ``example_fields`` is a small valid
config of the method. Both feed the shared test matrix (``tests/method_matrix.py``): adding a method is its file
(registered with ``@register``; :mod:`qaft.methods` imports every module of the package) plus its preset
``conf/method/<name>.yaml``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from qaft.quant.activation import OFF, check_act_bits
from qaft.quant.affine import VALID_BITS
from qaft.quant.gptq import GPTQOptions
from qaft.quant.granularity import granularity
from qaft.quant.init import Init, parse_init, parse_zero_point

# The default target_modules: every linear layer of every decoder block, resolved per model (qaft.methods.targets).
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = (ALL_LINEAR,)
TRAIN = "train"  # the phase name of single-phase methods
INTEGER, FLOAT = "integer", "float"  # what a merge deploys (MethodTraits.merges_to)


@dataclass(frozen=True)
class MethodTraits:
    """What a method is, declared once on its config class (``traits = MethodTraits(...)``).

    Declared, because only a built and trained model shows them:

    * ``merges_to``: :data:`INTEGER` (``merge()`` deploys integer :class:`~qaft.quant.linear.QuantizedLinear`
      layers) or :data:`FLOAT` (a float model; deploying it at n bits is a PTQ afterwards).
    * ``bit_exact``: the merged model computes the training forward bit for bit (else to float rounding).
    * ``trains_quantizer``: the layer's quantizer (``s, b`` or ``s, z``) is a trained submodule, ``quantizer``.
    * ``trains_weights``: the full weights ``W`` train (full QAT, no adapter).
    * ``starts_at_ptq``: before its first step the model is exactly the RTN PTQ model with the same ``init``.
    * ``offsets_move``: the merge moves the offsets off the quantizer's grid (QA-LoRA absorbs ``B A`` into them), so
      no integer zero point (``zero_point="int"``) survives it: formats that need one take it only approximately.
    * ``symmetric_grid``: the method's grid is always symmetric (offset 0; LLM-QAT), whatever its settings.

    Derived by :func:`register` from the class (declaring one is a ``TypeError``):

    * ``adapter``: LoRA ``A, B`` train (the config has :class:`LoRAFields`).
    * ``teacher``: trained by distillation from the float model (the config overrides :meth:`MethodConfig.teacher`).
    * ``zero_point``: takes ``zero_point="int"`` (the config has the field; :attr:`MethodConfig.int_zero_fields`
      says what else that needs).
    * ``act_kv``: takes ``act_bits`` / ``kv_bits``.
    * ``calibration``: needs calibration data in some setting (the config has :class:`CalibrationFields`, e.g.
      through :class:`GPTQFields`;
      :attr:`MethodConfig.calibrated_fields` names the settings).
    """

    merges_to: str
    bit_exact: bool = False
    trains_quantizer: bool = False
    trains_weights: bool = False
    starts_at_ptq: bool = False
    offsets_move: bool = False
    symmetric_grid: bool = False
    adapter: bool | None = None
    teacher: bool | None = None
    zero_point: bool | None = None
    act_kv: bool | None = None
    calibration: bool | None = None

    def __post_init__(self) -> None:
        choice("merges_to", self.merges_to, (INTEGER, FLOAT))

    @property
    def trains(self) -> bool:
        """Whether anything trains (every method but PTQ)."""
        return bool(self.adapter or self.trains_quantizer or self.trains_weights)


@dataclass(kw_only=True)
class MethodConfig:
    """Fields every method has; subclasses add theirs and implement :meth:`make_layer`.

    ``target_modules``: :data:`ALL_LINEAR` (every linear layer of every decoder block) and / or linear layers by
    their last name component (``q_proj``, ``lm_head``, ...); :mod:`qaft.methods.targets` resolves them on the model.
    ``act_bits`` / ``kv_bits``: the dynamic per-token quantizer (:mod:`qaft.quant.activation`) on the input of
    every target linear / on the outputs of ``k_proj`` and ``v_proj`` (the KV cache), 2..8 bits; 16 (the
    default) leaves them float and the model exactly the weight-only one (:mod:`qaft.methods.act_kv`).
    """

    name: ClassVar[str] = ""
    traits: ClassVar[MethodTraits]  # declared by every registered class; register() completes it
    # A small valid config on a model 64 wide (tests' tiny LLaMA): several groups per row, a short first phase.
    example_fields: ClassVar[Mapping[str, Any]] = {}
    # What else zero_point="int" needs beside example_fields (LoftQ: its integer base; NF4 has no zero point).
    int_zero_fields: ClassVar[Mapping[str, Any]] = {}
    # The settings in which the method needs calibration data (traits.calibration), one example each.
    calibrated_fields: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    act_bits: int = OFF
    kv_bits: int = OFF

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer, e.g. ('q_proj', 'v_proj')")
        check_act_bits(self.act_bits, "act_bits")
        check_act_bits(self.kv_bits, "kv_bits")
        self.validate()

    def validate(self) -> None:
        """Checks that need no model; subclasses extend."""

    def validate_layer(self, module_name: str, linear: nn.Linear) -> None:
        """Checks that need the layer's shape (group size dividing ``in_features``)."""

    def phase_at(self, step: int) -> str:
        """The training phase at optimizer step ``step`` (0-based)."""
        return TRAIN

    def phase_boundaries(self) -> tuple[int, ...]:
        """Steps at which the phase changes (for trainers that want to log them)."""
        return ()

    def make_layer(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def calibration_options(self) -> GPTQOptions | None:
        """How a config that needs calibration data to be applied takes it: :class:`GPTQOptions`, whose
        ``calib_batches`` says how many training batches (GPTQ's other settings apply to GPTQ only; SmoothQuant
        and ``init='omniquant_lwc'`` take just the count, the config's ``calib_batches`` where it has one);
        ``None`` (the default) when :meth:`make_layer` builds every layer from its weights alone."""
        if getattr(self, "init", None) == Init.OMNIQUANT_LWC.value:
            return GPTQOptions(calib_batches=getattr(self, "calib_batches", GPTQOptions.calib_batches))
        return None

    def apply_calibrated(self, model: nn.Module, calib_batches: Iterable[Any]) -> None:
        """Convert ``model``'s target layers in place from calibration batches; only where :meth:`calibration_options`
        is not ``None``. Called by :func:`qaft.methods.api.apply_method`, which validates the layers first."""
        raise NotImplementedError(f"method {self.name!r} needs no calibration data")

    def teacher(self, model: nn.Module) -> AbstractContextManager[Any] | None:
        """For a method trained by distillation: a context under which ``model`` (this method applied) computes
        the frozen float teacher's forward, so the loss is :func:`qaft.methods.distill.distilled_loss`. ``None``
        (the default): the method trains on the labels (``model(**batch).loss``)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass(kw_only=True)
class LoRAFields:
    """Low-rank adapter ``alpha / rank * B A``."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0

    def _validate_lora(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number > 0 (the adapter's scale is alpha / rank), got {alpha!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(kw_only=True)
class QuantFields:
    """The integer quantizer's settings.

    ``zero_point``: ``"float"`` (the offset ``b`` is any float) or ``"int"`` (``b = s (2^(n-1) - z)`` with an
    integer ``z``, the GPTQ / AutoGPTQ grid where 0 is always a level; see :mod:`qaft.quant.init`). Methods that
    train the quantizer learn ``z`` through a straight-through round. Where a method cannot keep an integer zero
    its docstring says so (QA-LoRA's merge moves offsets by design; float-merged methods deploy by a PTQ, whose
    own ``zero_point`` applies).
    """

    bits: int = 4
    group_size: int = 64
    init: str = "minmax"
    symmetric: bool = False
    zero_point: str = "float"
    lsq_grad_scale: bool = False

    def _validate_quant(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits must be one of {VALID_BITS}, got {self.bits!r}")
        granularity(self.group_size)
        self.init = parse_init(self.init).value
        self.zero_point = parse_zero_point(self.zero_point).value

    def _validate_groups(self, module_name: str, linear: nn.Linear) -> None:
        try:
            granularity(self.group_size).group_size(linear.in_features)
        except ValueError as err:
            raise ValueError(f"{module_name}: {err}") from None


@dataclass(kw_only=True)
class CalibrationFields:
    """How many batches of the training stream a method that needs calibration data takes (``calib_batches``):
    GPTQ, SmoothQuant, EfficientQAT's Block-AP. A config with this field may need data (``traits.calibration``)."""

    calib_batches: int = GPTQOptions.calib_batches


@dataclass(kw_only=True)
class GPTQFields(CalibrationFields):
    """GPTQ's settings, flat on a method config that may use GPTQ (``method.calib_batches`` ...); their defaults
    and checks are :class:`~qaft.quant.gptq.GPTQOptions`'."""

    act_order: bool = GPTQOptions.act_order
    percdamp: float = GPTQOptions.percdamp

    def gptq_options(self) -> GPTQOptions:
        """The options as one value (raises ``ValueError`` on a bad field)."""
        return GPTQOptions(calib_batches=self.calib_batches, act_order=self.act_order, percdamp=self.percdamp)


@dataclass(kw_only=True)
class QuantMethodConfig(MethodConfig, QuantFields):
    def validate(self) -> None:
        self._validate_quant()

    def validate_layer(self, module_name: str, linear: nn.Linear) -> None:
        self._validate_groups(module_name, linear)


@dataclass(kw_only=True)
class LoRAMethodConfig(MethodConfig, LoRAFields):
    def validate(self) -> None:
        self._validate_lora()


@dataclass(kw_only=True)
class QuantLoRAMethodConfig(MethodConfig, LoRAFields, QuantFields):
    def validate(self) -> None:
        self._validate_lora()
        self._validate_quant()

    def validate_layer(self, module_name: str, linear: nn.Linear) -> None:
        self._validate_groups(module_name, linear)


def non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def rtn_only_init(init: str, base: str) -> None:
    """``init='omniquant_lwc'`` learns a round-to-nearest range: refused on a base that fits its own (GPTQ ...)."""
    if init == Init.OMNIQUANT_LWC.value and base != "rtn":
        raise ValueError(f"init='omniquant_lwc' learns the ranges of a round-to-nearest base; {base} fits its own "
                         "(use init='minmax', or the rtn base)")


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


_REGISTRY: dict[str, type[MethodConfig]] = {}


def _derived_traits(cls: type[MethodConfig]) -> dict[str, bool]:
    fields = set(cls.field_names())
    return {"adapter": issubclass(cls, LoRAFields), "teacher": cls.teacher is not MethodConfig.teacher,
            "zero_point": "zero_point" in fields, "act_kv": {"act_bits", "kv_bits"} <= fields,
            "calibration": issubclass(cls, CalibrationFields)}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: ``cls`` becomes method ``cls.name``, its declared traits completed by the derived ones.

    A class without its own ``traits``, or declaring a derived one, is a ``TypeError`` at import: a subclass
    must not inherit what another method is, nor state what its code already says."""
    declared = vars(cls).get("traits")
    if not isinstance(declared, MethodTraits):
        raise TypeError(f"{cls.__name__} must declare its traits: traits = MethodTraits(merges_to=..., ...)")
    derived = _derived_traits(cls)
    stated = sorted(key for key in derived if getattr(declared, key) is not None)
    if stated:
        raise TypeError(f"{cls.__name__}.traits: {stated} follow from the class; do not declare them")
    cls.traits = dataclasses.replace(declared, **derived)
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def registered(name: str) -> type[MethodConfig]:
    """The config class of method ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available()}")
    return _REGISTRY[name]


def traits(name: str) -> MethodTraits:
    """The traits of method ``name`` (declared and derived)."""
    return registered(name).traits


def config_for(name: str, **fields: Any) -> MethodConfig:
    """The config of method ``name`` with ``fields`` set; unknown names or fields raise ``ValueError``."""
    cls = registered(name)
    unknown = sorted(set(fields) - set(cls.field_names()))
    if unknown:
        raise ValueError(f"method {name!r} has no field(s) {unknown}; its fields: {cls.field_names()}")
    return cls(**fields)


__all__ = ["ALL_LINEAR", "DEFAULT_TARGETS", "FLOAT", "INTEGER", "CalibrationFields", "GPTQFields", "MethodConfig",
           "MethodTraits", "available", "config_for", "field", "register", "registered", "traits"]
