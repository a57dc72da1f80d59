"""Memory-bounded, compiled forms of the merge methods (``MethodSpec.blocked``).

Modules: ``blocks`` (block-summed statistics, the block size), ``elementwise``
(linear, nearswap, passthrough), ``spherical`` (slerp, nuslerp, multislerp, karcher),
``model_stock``, ``fusion`` (ram, ramplus_tl, arcee_fusion). The task-arithmetic family's forms
are ``row_blocks`` and ``sce_rows``.

The plain methods take float32 copies of every input and run one MLX op at a time: on the CPU
each op is a pass over memory, and each float32 temporary of a large tensor is a fresh
allocation whose pages the kernel must fault in (glibc maps allocations over 32 MB anew every
time). Here the inputs stay in their stored dtype and the arithmetic is one ``mx.compile``d
kernel that casts on the fly and writes the output dtype directly: no float32 copy of a whole
tensor exists, and the whole-tensor statistics SLERP needs are summed block by block.

The same holds for the methods whose statistics are whole-tensor reductions followed by
elementwise work: each statistic is a block-summed pass (``block_sums``) whose compiled kernel
rebuilds what it needs per entry from the stored inputs (task vectors, unit tensors, the mean,
the tangent), the scalars between passes use the plain function's ops, and one last kernel
writes the output. passthrough is one kernel, RAM two (counts, merge), nearswap MLX's own
ops per block; model_stock and nuslerp need one and two statistics passes; multislerp and
karcher are linear combinations of their inputs, so one Gram pass gives every norm and dot
(karcher's iterations run on N coefficients, no pass and no float32 tensor); arcee_fusion keeps
its importance in float32 and takes the quantiles as exact order statistics without a sort.
Per-row statistics (model_stock's filter_wise, nuslerp without flattening) run over blocks of
whole rows. mx.compile fuses only short chains of ops (past ~10 it stores whole-tensor float32
intermediates), so every final kernel is kept short or run per block.

Same formulas as ``linear.py``, ``spherical.py``, ``model_stock.py`` and ``fusion.py``; results
agree with them to float32 rounding (a compiled kernel may fuse a multiply and an add; the
statistics are summed in 1024-entry groups as ``common.fsum`` does, in another order; with
OpenBLAS loaded the group sums themselves round differently; multislerp and karcher combine
float64 scalars in another order), bit for bit where none applies
(``tests/merge/test_method_kernels.py``).
"""

from mlxmerge.merge.methods.kernels import blocks
from mlxmerge.merge.methods.kernels.blocks import block_sums, norms_and_dot
from mlxmerge.merge.methods.kernels.elementwise import linear, nearswap, passthrough
from mlxmerge.merge.methods.kernels.fusion import arcee_fusion, ram, ramplus_tl
from mlxmerge.merge.methods.kernels.model_stock import model_stock
from mlxmerge.merge.methods.kernels.spherical import karcher, multislerp, nuslerp, slerp

__all__ = [
    "arcee_fusion", "block_sums", "blocks", "karcher", "linear", "model_stock", "multislerp",
    "nearswap", "norms_and_dot", "nuslerp", "passthrough", "ram", "ramplus_tl", "slerp",
]  # fmt: skip
