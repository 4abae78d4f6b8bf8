"""A copy of a GGUF file with its quantized 2-D tensors re-quantized to another type (Q8_0 by default).

    python benchmarks/requantize_gguf.py SRC.gguf DST.gguf            e.g. SmolLM2's Q4_1 file as Q8_0
    python benchmarks/requantize_gguf.py SRC.gguf DST.gguf --type Q5_0

For the weight formats the wheels do not ship: each tensor stored in a quantized type is dequantized
and quantized again with the ``gguf`` package (which quantizes Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, not
the K-quants); F32/F16/BF16 tensors (norms) and the metadata are copied as they are (the copy
follows the ``gguf`` package's own ``gguf_new_metadata`` script). The result is a real model file of
that type, whose values are the source's rounded once more, not the original checkpoint's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

UNQUANTIZED = ("F32", "F16", "BF16")


def requantize(src: Path, dst: Path, kind: str) -> dict[str, int]:
    """Write ``dst``; returns how many tensors of each type it holds."""
    qtype = gguf.GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    data = {}
    for tensor in reader.tensors:
        values = np.asarray(tensor.data)
        if tensor.tensor_type.name not in UNQUANTIZED and len(tensor.shape) == 2:
            dense = gguf.quants.dequantize(values, tensor.tensor_type)  # [rows, weights per row]
            values = gguf.quants.quantize(dense.astype(np.float32), qtype)
            data[tensor.name] = (values, qtype)
        else:
            data[tensor.name] = (values, tensor.tensor_type)
        writer.add_tensor_info(tensor.name, data[tensor.name][0].shape, data[tensor.name][0].dtype,
                               data[tensor.name][0].nbytes, data[tensor.name][1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for values, stored in data.values():
        writer.write_tensor_data(values, tensor_endianess=reader.endianess)
        counts[stored.name] = counts.get(stored.name, 0) + 1
    writer.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--type", default="Q8_0", choices=["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
    args = parser.parse_args(argv)
    print(f"{args.dst}: {requantize(args.src, args.dst, args.type)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
