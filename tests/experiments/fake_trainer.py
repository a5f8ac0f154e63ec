"""A stand-in for train.sh with flame's run-folder contract; its loss is a pure function of the config.

loss(step) = 1 + (log10(lr) + 2.5)^2 + 0.01 * seed + 1 / step (best lr: 10^-2.5); a run that ends its
warmup-stable-decay schedule (``lr_scheduler.decay_ratio`` set, ``schedule_steps`` unset or reached: a full
run or a cool-down fork) validates 20 * lr lower at its last step. Checkpoints every
``checkpoint.interval`` steps and at the end (``step-N/.metadata``); resumes from the newest, or starts
at step N of ``checkpoint.fork_from`` (``.../step-N``); SIGTERM: save, write preempted.json, exit 75;
``optimizer.lr >= 0.5``: "diverged" at step 2, exit 1; ``0.2 <= lr < 0.5``: a NaN validation loss.
FAKE_STEP_SECONDS slows it.
"""

import json
import math
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from flame.config.loader import load_toml

config = load_toml(sys.argv[1])
folder = config.job.dump_folder
ck = os.path.join(folder, "checkpoint")
steps, lr, seed = config.training.steps, config.optimizer.lr, config.training.seed
done = (
    [int(n[5:]) for n in os.listdir(ck) if os.path.exists(os.path.join(ck, n, ".metadata"))]
    if os.path.isdir(ck)
    else []
)
start = max(done, default=0)
fork = config.checkpoint.fork_from
if fork and not done:
    if not os.path.exists(os.path.join(fork, ".metadata")):
        print(f"flame: error: --checkpoint.fork_from: {fork!r} does not exist", flush=True)
        sys.exit(2)
    start = int(os.path.basename(os.path.normpath(fork))[5:])
schedule = config.lr_scheduler.schedule_steps or steps
decays = config.lr_scheduler.decay_ratio is not None and schedule == steps
if os.path.exists(os.path.join(folder, "preempted.json")):
    os.remove(os.path.join(folder, "preempted.json"))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
metrics_path = os.path.join(folder, "metrics.jsonl")
kept = []
if os.path.exists(metrics_path):
    kept = [line for line in open(metrics_path) if json.loads(line)["step"] <= start]
with open(metrics_path, "w") as f:
    f.writelines(kept)
print(f"fake trainer: {'resumed at step ' + str(start) if start else 'fresh start'}", flush=True)


def save(step):
    os.makedirs(os.path.join(ck, f"step-{step}"), exist_ok=True)
    open(os.path.join(ck, f"step-{step}", ".metadata"), "w").close()


loss = final_val = None
for step in range(start + 1, steps + 1):
    time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
    if lr >= 0.5 and step == 2:
        print("flame: error: training diverged: 10 consecutive steps with a non-finite gradient norm", flush=True)
        sys.exit(1)
    loss = 1 + (math.log10(lr) + 2.5) ** 2 + 0.01 * seed + 1 / step
    record = {"step": step, "loss": loss}
    if step == steps:
        record["validation_loss"] = loss - (20 * lr if decays else 0.0)
        if 0.2 <= lr < 0.5:
            record["validation_loss"] = float("nan")
        final_val = record["validation_loss"]
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if config.checkpoint.enable_checkpoint and (step % config.checkpoint.interval == 0 or step == steps or stop):
        save(step)
    if stop:
        json.dump({"step": step, "signal": "SIGTERM"}, open(os.path.join(folder, "preempted.json"), "w"))
        print(f"fake trainer: stopped after step {step}", flush=True)
        sys.exit(75)
summary = {
    "steps": steps,
    "final_loss": loss,
    "final_validation_loss": final_val,
    "checkpoint": os.path.join(ck, f"step-{steps}"),
    "hf_export": None,
}
json.dump(summary, open(os.path.join(folder, "summary.json"), "w"))
