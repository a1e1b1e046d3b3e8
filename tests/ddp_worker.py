"""Run by tests/test_distributed.py, once per process (under torchrun, or alone): train from
the ``meanflow train`` arguments given and save this rank's final weights to
``$MEANFLOW_TEST_DUMP/rank{RANK}.safetensors``. Not a test module itself.

With ``MEANFLOW_TEST_KILL_AT=K``, rank 1 of the first attempt (torchrun's restart count 0)
sends itself SIGKILL when it reaches its K-th checkpoint, before joining it: a crash at a known
step, so the restart test never races the end of the run."""

import faulthandler
import os
import signal
import sys

from safetensors.torch import save_file

from meanflow.runtime import distributed
from meanflow.cli import build_parser
from meanflow.cli.train import train_request
from meanflow.runtime.threads import set_threads
from meanflow.train.loop import train
from meanflow.train.rundir import plan_run


def _kill_at_checkpoint(k: int) -> None:
    """Die by SIGKILL at the k-th checkpoint's gather (every rank calls it once per save)."""
    gather, calls = distributed.gather_objects, [0]

    def gather_or_die(obj):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return gather(obj)

    distributed.gather_objects = gather_or_die


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)
    if (os.environ.get("MEANFLOW_TEST_KILL_AT") and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        _kill_at_checkpoint(int(os.environ["MEANFLOW_TEST_KILL_AT"]))
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    set_threads(args.threads)
    plan = plan_run(train_request(args))
    for note in plan.notes:
        print(f"meanflow: {note}", file=sys.stderr)
    result = train(plan.cfg, args.out, resume=plan.resume, overwrite=plan.overwrite,
                   progress=False, data=plan.data)
    state = {f"model.{k}": v.detach().contiguous() for k, v in result.model.state_dict().items()}
    state.update({f"ema.{k}": v.detach().contiguous()
                  for k, v in result.ema_model.state_dict().items()})
    rank = os.environ.get("RANK", "0")
    save_file(state, os.path.join(os.environ["MEANFLOW_TEST_DUMP"], f"rank{rank}.safetensors"))
