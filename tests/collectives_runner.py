"""Run on 2 gloo ranks by tests/test_collectives.py: every collective of trainer/runtime/collectives.py, with a
process-group timeout (3 s) shorter than rank 0's solo work (6 s). Each rank writes what it saw to
$OUT/rank<r>.json."""
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.runtime import collectives  # noqa: E402
from trainer.runtime.engines import init_distributed  # noqa: E402

TIMEOUT_S, SLOW_S = 3.0, 6.0

info = init_distributed(collective_timeout_s=TIMEOUT_S, main_work_timeout_s=120.0)
rank = info.rank
seen: dict = {"rank": rank, "world_size": collectives.world_size()}
seen["any_of_rank1"] = collectives.any_rank(rank == 1)
seen["any_of_none"] = collectives.any_rank(False)
means = collectives.mean_over_ranks({"a": float(rank), "b": math.nan if rank == 0 else 2.0})
seen["means"] = {k: (None if math.isnan(v) else v) for k, v in means.items()}
seen["strings"] = collectives.gather_strings(f"r{rank}")
seen["broadcast"] = collectives.broadcast({"from": rank})

start = time.perf_counter()
seen["slow_result"] = collectives.on_main("slow work", lambda: (time.sleep(SLOW_S), 42)[1])
seen["waited_s"] = time.perf_counter() - start


def fails():
    raise OSError("disk full")


try:
    collectives.on_main("failing work", fails)
except Exception as err:
    seen["failure"] = f"{type(err).__name__}: {err}"
collectives.barrier()  # the default group still works after all that
seen["after"] = collectives.gather_strings("ok")

# The control: the same slow work awaited in a plain barrier of the default group times out.
try:
    if rank == 0:
        time.sleep(SLOW_S)
    collectives.barrier()
    seen["plain_barrier"] = "passed"
except Exception as err:  # gloo: "Timed out waiting ... ms for recv operation"
    seen["plain_barrier"] = f"failed: {type(err).__name__}"
Path(os.environ["OUT"], f"rank{rank}.json").write_text(json.dumps(seen))
os._exit(0)  # the default group is broken by the control; skip its teardown
