"""Which methods and settings export exactly to which format, from the methods' traits (README's table).

What a format can hold is the deployed layer's grid, ``W = s q + b`` per group (:mod:`qaft.quant.linear`):

* ``format=qaft`` stores ``q``, ``s`` and ``b`` as they are: every deployed model, bit for bit.
* ``format=hf`` (torchao) stores ``q`` and ``s`` as they are and the zero point ``z = -b / s``: an integer ``z``
  (int8) where ``b`` is on the integer-zero grid, else a float32 ``z`` (float rounding of ``W``).
* ``format=gguf`` (Q4_1) stores ``q`` and fp16 ``s``, ``b`` for up to 4 bits in groups a multiple of 32, whatever
  the method; other layouts only re-quantized (``approximate=true``).
* ``format=compressed-tensors`` stores ``q``, ``s`` and an integer ``z`` or none: exact for a symmetric grid or the
  integer-zero one, approximate (``approximate=true``) for float offsets.

A method's deployed grid follows from its traits (:class:`qaft.methods.MethodTraits`): a float merge is deployed
by round-to-nearest PTQ with a float zero point (:data:`qaft.deploy.merged.FLOAT_MERGE_PTQ`); an integer merge
keeps the integer zero point of ``zero_point="int"`` (trait ``zero_point``) unless its merge moves the offsets
(``offsets_move``); a ``symmetric_grid`` method has offset 0. ``python -m qaft.deploy.exactness`` prints the table.
"""
from __future__ import annotations

from qaft.deploy.merged import FLOAT_MERGE_PTQ
from qaft.methods import INTEGER, MethodTraits, available, traits

EXACT, ROUNDING, APPROX = "exact", "float rounding", "`approximate=true` only"
HEADER = ("method", "merges to", "takes `zero_point=int`", "format=hf", "format=compressed-tensors")


def integer_zero(t: MethodTraits) -> str:
    """Which deployed models of the method have an exact integer zero point (or none at all): always, with
    ``zero_point=int``, or never (``""``)."""
    if t.merges_to != INTEGER:
        return "always" if FLOAT_MERGE_PTQ["zero_point"] == "int" else ""
    if t.symmetric_grid:
        return "always"
    return "zero_point=int" if t.zero_point and not t.offsets_move else ""


def cells(t: MethodTraits) -> tuple[str, str]:
    """The cells of ``format=hf`` and ``format=compressed-tensors`` for a method with traits ``t`` (``format=qaft``
    is bit for bit and ``format=gguf`` the same for every method: the table leaves them out)."""
    when = integer_zero(t)
    if when == "always":
        hf = ct = EXACT
    elif when:
        hf, ct = f"{EXACT} with `{when}`, else {ROUNDING}", f"{EXACT} with `{when}`, else {APPROX}"
    else:
        hf, ct = ROUNDING, APPROX
    return hf, ct


def exactness_rows() -> list[tuple[str, ...]]:
    """One row per registered method: name, what it merges to (float: deployed +PTQ), whether it takes the integer
    zero point, and the cell of each format."""
    rows = []
    for name in available():
        t = traits(name)
        merges = "integer" if t.merges_to == INTEGER else "float (+PTQ, float zero point)"
        rows.append((f"`{name}`", merges, _takes(t), *cells(t)))
    return rows


def _takes(t: MethodTraits) -> str:
    if not t.zero_point:
        return "no (symmetric grid)" if t.symmetric_grid else "no"
    if t.merges_to != INTEGER:
        return "yes (its base; the float merge drops it)"
    return "yes (the merge moves it)" if t.offsets_move else "yes"


def exactness_table() -> str:
    """The markdown table README.md holds (a test checks that it is this one)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in exactness_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(exactness_table())
