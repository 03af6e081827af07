"""Build, once, the DeepSpeed op that its CPU communication backend JIT-compiles on first use.

DeepSpeed compiles `deepspeed_shm_comm` with g++/ninja the first time a process group is set up on CPU (45-60 s). If
several ranks (or several test jobs) hit that at once they each rebuild it and can exceed their timeouts. Building it
here, into the TORCH_EXTENSIONS_DIR that the Makefile and tests share, makes every later launch find it cached.
"""

import os
import sys
import time


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):
        print(f"build_deepspeed_ops: no shared-memory comm op for accelerator {get_accelerator().device_name()}")
        return 0
    start = time.perf_counter()
    builder.load(verbose=False)
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", "the default torch extensions directory")
    print(f"build_deepspeed_ops: {builder.absolute_name()} ready in {cache} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
