"""torchrun entry for tests: the real `distributed.main`, with a spy on the tokens each
rank's vision transformer really receives, and an injected fault on request.

Environment: JUICER_TEST_OUT (a folder: each rank writes fed-rank<r>.json there) and
JUICER_TEST_FAULT = "raise:<rank>:<step>" or "hang:<rank>:<step>" (that rank raises, or stops
answering, at that optimizer step)."""
import json
import os
import sys
import time
from pathlib import Path

from juicer_pipeline.training import distributed, trainer

rank = int(os.environ["RANK"])
fed: list[int] = []
_install = trainer.install_kept_tokens


def _spying_install(model):
    model.visual.transformer.register_forward_pre_hook(
        lambda m, args: fed.append(args[0].shape[0] * args[0].shape[1]) if m.training else None)
    return _install(model)


trainer.install_kept_tokens = _spying_install

fault = os.environ.get("JUICER_TEST_FAULT")
if fault:
    kind, fault_rank, fault_step = fault.split(":")
    if int(fault_rank) == rank:
        _step, steps = trainer.Optimizers.step, [0]

        def _faulty_step(self):
            steps[0] += 1
            if steps[0] == int(fault_step):
                if kind == "raise":
                    raise RuntimeError(f"injected fault in rank {rank} at step {steps[0]}")
                time.sleep(600)  # a rank that stops answering: the others must time out, not hang
            _step(self)

        trainer.Optimizers.step = _faulty_step

distributed.main(sys.argv[1:])
if os.environ.get("JUICER_TEST_OUT"):
    (Path(os.environ["JUICER_TEST_OUT"]) / f"fed-rank{rank}.json").write_text(json.dumps(fed))
