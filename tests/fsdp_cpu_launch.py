"""Launch target for the FSDP tests: the bert-recipes CLI with Accelerate's FSDP path on
CPU ranks (gloo), so FSDP runs can be tested without GPUs.

Accelerate turns CPU ranks into ``MULTI_CPU`` and ignores the FSDP plugin there, while
torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo. After Accelerate has set up
its state with the FSDP plugin of the config file, this script switches the distributed
type to FSDP, exactly as Accelerate does on GPUs (``AcceleratorState`` sets it and copies
it into ``PartialState``). Everything else (wrapping, sharded optimizer, state-dict
gathering, ``save_state``/``load_state``) is Accelerate's own FSDP2 code.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/fsdp.yaml \\
        --num_processes 2 --mixed_precision no tests/fsdp_cpu_launch.py pretrain RECIPE ...
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from bert_recipes.cli import main

    sys.exit(main(sys.argv[1:]))
