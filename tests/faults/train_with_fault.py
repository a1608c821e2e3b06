"""rskdist/train.py with one injected fault, for the failure tests (tests/test_failures.py).

    deepspeed --num_gpus 2 tests/faults/train_with_fault.py FAULT RANK STEP --config C [key=value ...]
    RSKDIST_TEST_FAULT="FAULT RANK STEP" SCRIPT=tests/faults/train_with_fault.py bash launchers/torchrun.sh ...

FAULT is `raise` (an exception on rank RANK before step STEP), `nan` (rank RANK's
embeddings become NaN at step STEP), `kill` (rank RANK kills itself with SIGKILL before
step STEP), `killsave` (rank RANK writes its part of the checkpoint of step STEP, then
kills itself before `latest` moves), `hang` (rank RANK sleeps before step STEP) or
`killnode` (rank RANK SIGKILLs its launcher, then itself, before step STEP: a node lost).
RANK `any` is every rank that runs this file (under torchrun, one node's ranks when only
that node's command has the fault). Under torchrun's elastic agent the fault strikes in the
first attempt only, not in the restarts. The fault lives here, not in the package: the
trainer is patched from outside.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the checkout root, as rskdist/train.py does


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    if "RSKDIST_TEST_FAULT" in os.environ:  # for launchers that put their own arguments first
        args = os.environ["RSKDIST_TEST_FAULT"].split() + args
    fault, fault_rank, fault_step, argv = args[0], args[1], int(args[2]), args[3:]
    rank = int(os.environ.get("RANK", 0))
    struck = fault_rank == "any" or int(fault_rank) == rank
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        fault = "none"  # a fault strikes once: the group torchrun's agent restarts runs clean

    import rskdist.trainer as trainer_mod
    from rskdist import train

    original_step = trainer_mod.Trainer.train_step

    def faulty_step(self, images, labels):
        if struck and self.step == fault_step:
            if fault == "killnode":
                os.kill(os.getppid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "raise":
                raise RuntimeError(f"injected failure at step {self.step}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(3600)
            if fault == "nan":
                images = images.clone().fill_(float("nan"))
        return original_step(self, images, labels)

    trainer_mod.Trainer.train_step = faulty_step

    import rskdist.checkpoint as checkpoint_mod

    original_save = checkpoint_mod.CheckpointManager.save

    def faulty_save(self, step, client_state, **kw):
        if fault == "killsave" and struck and step == fault_step:
            self.engine.save_checkpoint(str(self.folder), tag=checkpoint_mod.step_tag(step),
                                        client_state=client_state, save_latest=False)
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save(self, step, client_state, **kw)

    checkpoint_mod.CheckpointManager.save = faulty_save
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
