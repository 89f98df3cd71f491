"""A PTX emulator of the few ops ``quant.triton_matmul.nibble_lut_asm`` emits (``and``, ``or``,
``shr``, ``prmt`` on b32), so that the register lookup's GPU-only text is tested on any CPU
(tests/test_triton_kernels.py). Test code: the engine never runs it."""
from __future__ import annotations


def emulate_nibble_lut(asm: str, word: int) -> tuple[list[int], list[int]]:
    """Run ``nibble_lut_asm``'s PTX on one 32-bit input (the ops it uses, PTX ISA semantics):
    returns ($0, $1, $2, $3) split into 16-bit values, as (hi-nibble values, lo-nibble values)."""
    regs = {"$4": word & 0xFFFFFFFF}

    def val(x):
        return int(x, 0) if x[0].isdigit() else regs[x]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        a = [val(x) for x in src]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":
            pool = (a[1] << 32 | a[0]).to_bytes(8, "little")
            r = 0
            for k in range(4):
                sel = (a[2] >> (4 * k)) & 0xF
                byte = pool[sel & 7]
                if sel & 8:  # replicate the sign bit
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * k)
        else:
            raise ValueError(f"unknown op {op}")
        regs[d] = r & 0xFFFFFFFF
    halves = [[regs[r] & 0xFFFF, regs[r] >> 16] for r in ("$0", "$1", "$2", "$3")]
    return halves[0] + halves[1], halves[2] + halves[3]
