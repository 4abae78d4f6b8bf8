"""KV cache formats: what each ``--kv-dtype`` name means, parsed once (``kv_format``) into the
``KVFormat`` the options, the runner and the cache pass along. Torch-free, so that the command line
can offer the names without loading torch (the torch dtype is looked up when a cache is made).

How each format stores and reads K/V: gpu_workers/model/kv_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from broker.errors import ConfigError

if TYPE_CHECKING:
    import torch

ScaleScheme = Literal["block", "tensor", "token", "centred"]
SCALE_BYTES = 4  # an fp32 scale (gpu_workers.model.fp8.SCALE_DTYPE)
DENSE_ITEMSIZE = 2  # the staged formats' dense (sink and staging) blocks hold bf16


@dataclass(frozen=True, slots=True)
class KVFormat:
    """How one ``--kv-dtype`` stores K/V: the element dtype and, for fp8, what each scale covers."""

    name: str  # the --kv-dtype name
    storage_name: str  # the torch dtype of stored elements (torch.<storage_name>)
    itemsize: int  # bytes per stored element
    # fp8 only: one scale per block (and KV head), per layer, or per token; "centred": keys centred
    # per (block, channel) with per-channel scales, values per token, sink and newest block in bf16
    # (gpu_workers.model.kv_quant, gpu_workers.model.kv_staged)
    scale: ScaleScheme | None = None
    offered: bool = True  # on the command line (per-token scales are kept only to measure against)

    @property
    def fp8(self) -> bool:
        return self.scale is not None

    @property
    def staged(self) -> bool:
        """Whether each sequence's first block (the sink) and newest, incomplete block (staged until
        it completes) are kept in dense bf16 blocks beside the fp8 pool (gpu_workers.model.kv_staged)."""
        return self.scale == "centred"

    @property
    def storage(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.storage_name)
        return dtype

    def bytes_per_head_block(self, block_size: int, head_dim: int) -> int:
        """Bytes of one block of one KV head's K (or V), its scales included (a staged format: half
        of K's and V's together, gpu_workers.model.kv_quant.bytes_per_block)."""
        if self.staged:
            codes = block_size * head_dim * self.itemsize
            # K: fp8 centres (D bytes) under an fp32 scale, bf16 channel scales; V: bf16 token scales
            return codes + (head_dim + SCALE_BYTES + 2 * head_dim + 2 * block_size) // 2
        scales = {None: 0, "tensor": 0, "block": 1, "token": block_size}[self.scale]
        return block_size * head_dim * self.itemsize + scales * SCALE_BYTES

    def dense_bytes_per_head_block(self, block_size: int, head_dim: int) -> int:
        """Bytes of one dense (bf16) block of one KV head's K (or V): a staged format's sinks and
        staging blocks."""
        return block_size * head_dim * DENSE_ITEMSIZE

    def __str__(self) -> str:
        return self.name


KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in (
    KVFormat("fp32", "float32", 4),
    KVFormat("bf16", "bfloat16", 2),
    KVFormat("fp16", "float16", 2),
    KVFormat("fp8_e4m3", "float8_e4m3fn", 1, "centred"),
    KVFormat("fp8_e4m3_block", "float8_e4m3fn", 1, "block"),
    KVFormat("fp8_e5m2", "float8_e5m2", 1, "block"),
    # one static scale per layer (vLLM's uncalibrated default), offered for comparison
    KVFormat("fp8_e4m3_per_tensor", "float8_e4m3fn", 1, "tensor"),
    KVFormat("fp8_e4m3_per_token", "float8_e4m3fn", 1, "token", offered=False),
)}
# The command line's choices, in the order --help lists them (the default first).
KV_DTYPES = ("fp8_e4m3", "fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor", "bf16", "fp16", "fp32")
assert set(KV_DTYPES) == {name for name, f in KV_FORMATS.items() if f.offered}


def kv_format(kv_dtype: str | KVFormat) -> KVFormat:
    """The format a ``--kv-dtype`` name stands for (a format is returned as it is); ConfigError
    naming the choices for an unknown name."""
    if isinstance(kv_dtype, KVFormat):
        return kv_dtype
    try:
        return KV_FORMATS[kv_dtype]
    except KeyError:
        raise ConfigError(f"kv_dtype {kv_dtype!r}: one of {', '.join(KV_FORMATS)}") from None
