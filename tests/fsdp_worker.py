"""``egrpo train`` under torchrun with probes, for tests/test_distributed.py (not a test module itself).

--record FILE   each rank writes FILE.<rank>.json: the device type of every tensor handed to egrpo's own
                collectives, and what its model held before and after the shards were filled
--die-at-save N rank 0 kills its process group mid-checkpoint N: after every rank wrote its DCP shards,
                before the checkpoint is published (a crash at the worst moment of a save)
"""

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from egrpo import checkpoint, cli, distributed
from egrpo.embedded import assets
from egrpo.sharding import local_part
from egrpo.trainer import Trainer

COLLECTIVES = {
    "all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "reduce_scatter", "all_to_all",
    "all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list", "barrier",
}


class RecordingDist:
    """torch.distributed as egrpo.distributed sees it, noting the device of every tensor a collective gets."""

    def __init__(self, log: list):
        self._log = log

    def __getattr__(self, name):
        target = getattr(dist, name)
        if name not in COLLECTIVES:
            return target

        def call(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            self._log.append({"op": name, "devices": sorted({t.device.type for t in tensors})})
            return target(*args, **kwargs)

        return call


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record")
    parser.add_argument("--die-at-save", type=int)
    args, rest = parser.parse_known_args()
    rank = int(os.environ["RANK"])
    report: dict = {"collectives": []}

    def forbid_full_load(*_args, **_kwargs):
        raise AssertionError("FSDP must not load the whole base model on any rank")

    assets.load_base_policy = forbid_full_load
    if args.record:
        distributed.dist = RecordingDist(report["collectives"])
        fill = Trainer._fill_shards

        def recording_fill(self):
            report["meta_before_fill"] = all(p.is_meta for p in self.model.parameters())
            fill(self)
            report["local_elements"] = sum(local_part(p).numel() for p in self.model.parameters())
            report["model_elements"] = sum(p.numel() for p in self.model.parameters())

        Trainer._fill_shards = recording_fill
    if args.die_at_save:
        publish = checkpoint._publish

        def dying_publish(root, tmp, final):
            if final.name == f"iter-{args.die_at_save:06d}":
                os.kill(os.getpid(), signal.SIGKILL)
            return publish(root, tmp, final)

        checkpoint._publish = dying_publish
    code = cli.main(rest)
    if args.record:
        with open(f"{args.record}.{rank}.json", "w") as f:
            json.dump(report, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
