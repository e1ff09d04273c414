"""`streamer` command line: train, prepare, models, plan.

User errors print one line on stderr and exit 2; nothing else is printed for them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from streamer.errors import OUT_OF_TIME, Stopped, UserError, interrupt_on

if TYPE_CHECKING:  # the CLI imports torch only for the commands that need it
    from streamer.train import TrainConfig


def duration(text: str) -> float:
    """--time-limit's wall time in seconds, from `90s`, `45m`, `4h`, `2d`, `1h30m` (units
    summed), or a scheduler's `H:MM:SS` or `D-H:MM:SS`. A bare number is refused:
    seconds or minutes? (a scheduler's bare number means minutes; a mistake costs 60x)"""
    seconds = _duration(text)
    if seconds <= 0:
        raise UserError(f"--time-limit '{text}' is no time at all: give the run's wall time, as 4h")
    return seconds


def _duration(text: str) -> float:
    import re

    text = "".join(text.split())
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", text)
    if clock:
        days, hours, minutes, seconds = (int(g or 0) for g in clock.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text)
    if parts and "".join(number + unit for number, unit in parts) == text:
        return float(sum(float(number) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts))
    hint = f" (say {text}s or {text}m)" if re.fullmatch(r"\d+(?:\.\d+)?", text) else ""
    raise UserError(f"--time-limit '{text}' is not a duration{hint}: give it with units, as 90s, 45m, 4h or "
                    f"1h30m, or as H:MM:SS or D-H:MM:SS")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) so errors read alike."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a named model (no flags: tiny on the stdlib corpus)")
    _add_train_model(p.add_argument_group("model and data"))
    _add_train_optimizer(p.add_argument_group("steps and optimizer"))
    _add_train_placement(p.add_argument_group("where it runs"))
    _add_train_streaming(p.add_argument_group("streaming (--mode stream)"))
    _add_train_output(p.add_argument_group("output, checkpoints and stopping"))
    _add_train_evaluation(p.add_argument_group("held-out evaluation"))


def _add_train_model(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--model", default=None,
                   help="a registry name ('streamer models' lists them), or a folder of weights whose architecture "
                        "to train: a Hugging Face checkpoint, a run's final/ or one of its checkpoints (default: "
                        "--init-from's architecture, else tiny)")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="the model's vocabulary, in place of its own: N tokens, for data prepared with a tokenizer "
                        "of N (a tiny model on text of a BPE learned by 'prepare --train-tokenizer')")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from pretrained weights: a Hugging Face checkpoint (GPT-2, GPT-J, GPT-NeoX; "
                        "safetensors), a run's final/ or one of its checkpoints (with --model: of its architecture)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="token file(s) from 'streamer prepare' (default: stdlib corpus); several are drawn from "
                        "in the shares --data-weights gives")
    p.add_argument("--data-weights", nargs="+", type=float, default=None, metavar="W",
                   help="several --data files: each file's share of the training windows, in their order (any "
                        "positive numbers; default: the files' sizes)")
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=False,
                   help="attend within each document of a window only (data prepared with --separator), "
                        "learned positions counting from each document's start")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (at most the model's context)")


def _add_train_optimizer(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the whole run")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="cosine floor (default lr/10)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "wsd", "constant"],
                   help="after warmup: cosine decay to --min-lr; wsd: the peak, then the last --decay-fraction of "
                        "the steps decays (1 - sqrt); constant: the peak")
    p.add_argument("--decay-fraction", type=float, default=0.2, metavar="F",
                   help="--schedule wsd: the share of the steps that decays (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices and embeddings only")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm limit; 0 disables")
    p.add_argument("--seed", type=int, default=0, help="the initial weights' and the batches' draws")
    p.add_argument("--max-skipped-steps", type=int, default=0, metavar="N",
                   help="stop after N steps in a row with a non-finite loss or gradient norm (0: never)")


def _add_train_placement(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--mode", default="resident", choices=["resident", "stream"],
                   help="resident: all on one device; stream: weights stream from a host store")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on CUDA)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (runs torchrun)")
    p.add_argument("--grad-sync", default="sparse", choices=["sparse", "dense"],
                   help="data parallel: sum the embedding's row-sparse gradient sparsely or densely")


def _add_train_streaming(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--offload", default="auto", choices=["auto", "ram", "disk", "split"],
                   help="stream mode: where master weights and optimizer state live (split: the leading units "
                        "in RAM, the rest on disk)")
    p.add_argument("--store-dir", default=None, metavar="DIR",
                   help="stream mode: keep the disk tier in a folder of its own in DIR (a local NVMe, say) instead "
                        "of under --out; removed when the run ends")
    p.add_argument("--state", default="fp32", choices=["fp32", "compact", "compact8"],
                   help="stream mode: host state format: fp32 (16 bytes/parameter, exact), compact (about 6: "
                        "bf16 weights with stochastic rounding, 8-bit moments) or compact8 (about 5: compact with "
                        "an 8-bit gradient)")
    p.add_argument("--update-on", default="auto", choices=["auto", "host", "device"],
                   help="stream mode: run AdamW on the host beside the store, or on the compute device (the "
                        "state's chunks cross the link both ways; faster for --state compact on a GPU); auto: "
                        "the one the planner predicts the faster (on a CPU device, the host)")
    p.add_argument("--prefetch-depth", type=int, default=None, help="stream mode: units fetched ahead")
    p.add_argument("--held-units", type=int, default=None,
                   help="stream mode with --update-on device: the first N units keep their gradients on the device "
                        "and fetch their state during the backward, so their updates move nothing in the forward "
                        "(default: the planner decides; 0: none)")
    p.add_argument("--recompute", default="auto", choices=["auto", "yes", "no"],
                   help="stream mode: recompute each unit's forward in backward (auto: only if graphs do not fit)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="stream mode: peak memory to plan for (the device's; on CPU the process's); "
                        "the planner keeps graphs or recomputes to fit, or refuses")
    p.add_argument("--host-memory", type=float, default=None, metavar="GIB",
                   help="host RAM to plan the store with (resident on a CPU: to hold the model; default: what "
                        "the OS reports available; give it where that reading is not what the machine can give, as "
                        "in a VM whose RAM grows as it is used)")


def _add_train_output(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--out", default=None, help="output directory (default: runs/MODEL-TIMESTAMP)")
    p.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=True,
                   help="export the final weights to DIR/final (--no-save-final: a benchmark's run; checkpoints "
                        "still save)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write a checkpoint to DIR/checkpoints every N steps (0: never)")
    p.add_argument("--keep", type=int, default=2, metavar="K", help="complete checkpoints to keep")
    p.add_argument("--keep-every", type=int, default=0, metavar="N",
                   help="also keep, for good, the checkpoints of every N-th step (milestones; 0: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint, with the settings it "
                        "recorded (a flag given here overrides its setting)")
    p.add_argument("--time-limit", default=None, metavar="TIME",
                   help="the wall time the run has (as 4h, 90m or 1-12:00:00), counted from the command's start: "
                        "it stops in time with a checkpoint, and exits 75 (needs --checkpoint-every)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check the command as a run would (flags, model, data, disk space, a checkpoint to "
                        "resume) and print its plan on this machine, then stop: nothing is written")


def _add_train_evaluation(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N steps and after the last, the loss on held-out text: the data's last "
                        "--holdout, which training then never reads (0: no evaluation, training reads all)")
    p.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                   help="tokens per evaluation (default: one step's), the same windows every time")
    p.add_argument("--holdout", type=float, default=0.01, metavar="F",
                   help="with --eval-every: the fraction of the data held out, from its end")
    p.add_argument("--eval-data", nargs="+", default=None, metavar="FILE",
                   help="with --eval-every: held-out token file(s) of their own, read whole by each evaluation "
                        "(several: in their sizes' shares); training then reads all of --data")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text files into a token file")
    p.add_argument("inputs", nargs="*", type=Path, help="text files or folders (default: the stdlib sources)")
    p.add_argument("--out", required=True, type=Path, help="token file to write (.npy)")
    p.add_argument("--tokenizer", type=Path, default=None, help="a Hugging Face tokenizer.json (default: bytes)")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="learn a byte-level BPE of VOCAB tokens from the inputs first, written beside --out as "
                        "STEM.tokenizer.json, and tokenize with it")
    p.add_argument("--separator", default=None, metavar="TOKEN",
                   help="a token of the tokenizer to put after each document, each file (or, in JSON Lines, "
                        "each line) being one (GPT-2's: "
                        "'<|endoftext|>'), so that a model learns where texts end; 'sample' stops there and "
                        "'export' names it the end-of-text token (default: files joined as they are)")
    p.add_argument("--where", action="append", default=None, metavar="FIELD=VALUE",
                   help="JSON Lines inputs: only the documents whose FIELD (dotted for a nested one, as "
                        "meta.pile_set_name) holds VALUE; repeat it for more conditions, all to be met")
    p.add_argument("--eval-out", type=Path, default=None, metavar="FILE",
                   help="hold out a share of the documents, drawn over the whole corpus, into this second token "
                        "file: a validation split for 'train --eval-data'")
    p.add_argument("--eval-fraction", type=float, default=None, metavar="F",
                   help="with --eval-out: the share of the documents held out (default 0.01)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON Lines inputs (.jsonl, .ndjson, compressed or not): the field of each line's object "
                        "that holds its document's text (default: text)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="continue a prompt with a trained model (a run's final/ or a checkpoint)")
    p.add_argument("weights", metavar="DIR",
                   help="a run folder or its final/, or a Hugging Face checkpoint (GPT-2, GPT-J, GPT-NeoX)")
    p.add_argument("--prompt", default="def ", help="text to continue (default: 'def ')")
    p.add_argument("--tokens", type=int, default=200, help="tokens to add to the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0: always the likeliest token")
    p.add_argument("--top-k", type=int, default=200, help="draw among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="and among the fewest likeliest tokens whose probabilities reach p (1: all)")
    p.add_argument("--stop-token", type=int, default=None,
                   help="a token id that ends a continuation (default: the checkpoint's end of text, if it "
                        "names one; -1: none)")
    p.add_argument("--samples", type=int, default=1, help="continuations to print (drawn together, in one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="the tokenizer.json the data was prepared with (default: the checkpoint's own, "
                        "else bytes)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on CUDA)")
    p.add_argument("--mode", choices=("auto", "resident", "stream", "disk"), default="auto",
                   help="resident: the model whole on the device; stream: its weights in host memory, each "
                        "unit brought to the device for its turn (for a model larger than the device); disk: "
                        "each unit read from the checkpoint's files for every pass (for a model larger than "
                        "host memory too); auto: the first of these that fits")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="a trained model's loss on text (a run's held-out loss, or a checkpoint's on "
                                    "your data)")
    p.add_argument("weights", metavar="DIR", nargs="+",
                   help="a run folder or its final/ (its settings are the defaults), one of its checkpoints, or a "
                        "Hugging Face checkpoint; several: each one's loss (a run's checkpoints: its curve)")
    p.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE",
                   help="token file(s) from 'streamer prepare' (default: the run's, else the stdlib as bytes)")
    p.add_argument("--data-weights", nargs="+", type=float, default=None, metavar="W",
                   help="several --data files: each one's share of the windows (default: the run's, else the "
                        "files' sizes)")
    p.add_argument("--holdout", type=float, default=None,
                   help="read the last F of the data (of each file; default: the run's, else 0.01); 1: all of it")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens to read, in evenly spaced windows (default: the run's evaluation, else 16 sequences)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's, else the model's context")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per micro-batch (default: the run's, else 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on CUDA)")
    p.add_argument("--mode", choices=("auto", "resident", "stream", "disk"), default="auto",
                   help="as sample's: stream a model larger than the device, from host memory or from disk")
    p.add_argument("--document-mask", choices=("yes", "no"), default=None,
                   help="attend within each document of a window (data prepared with --separator); default: as "
                        "the run trained, else no")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a run's final weights as a Hugging Face checkpoint (for transformers)")
    p.add_argument("weights", metavar="DIR", help="a run folder or its final/")
    p.add_argument("--out", required=True, type=Path, help="a new (or empty) folder for the checkpoint")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as the run stored them)")
    p.add_argument("--shard-size", type=float, default=5.0,
                   help="GB per safetensors file; more than one file gets an index (default 5)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a tokenizer.json to put beside the weights (default: the one the run's data was "
                        "prepared with, if any)")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="where a training run stands: running, stopped or finished, its loss, "
                                      "speed, steps left and checkpoints")
    p.add_argument("runs", nargs="+", metavar="DIR", help="a run's --out folder, or several (runs/*)")
    p.add_argument("--json", action="store_true",
                   help="print the status as one JSON object (several runs: a list of them)")
    p.add_argument("--brief", action="store_true",
                   help="a line per run, side by side: state, steps, loss, held-out loss, speed, time left")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named model configs")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamer", description="Weight-streaming training for models larger than one device.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_train(sub)
    _add_prepare(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_status(sub)
    _add_models(sub)
    try:
        from streamer.planner import add_plan_parser
    except ImportError:
        pass
    else:
        add_plan_parser(sub)
    return parser


# The launcher's start, passed to the ranks it starts (seconds since the epoch).
STARTED_AT = "STREAMER_STARTED_AT"


READY_DIR = "STREAMER_READY_DIR"  # where a launched rank marks that it takes signals quietly
READY_WAIT_S = 60.0  # a rank that has not marked itself by then gets a signal anyway


def launch(nproc: int, argv: list[str], out: Path, started_at: float) -> int:
    """`streamer train --nproc N ...` is `torchrun --nproc-per-node N -m streamer train ...`.

    A signal goes to the ranks, not to torchrun: torchrun passes one on and kills every
    rank 30 s later, which would cut short the checkpoint that ranks write when a signal
    stops them ([Note: stopping on a signal] in streamer/train.py). So torchrun runs in a
    session of its own, out of the terminal's reach, and this process sends SIGINT,
    SIGTERM and SIGUSR1 (and SIGHUP, as SIGTERM) to the ranks itself, once they exist
    (`RankSignals`). They stop together after a step and exit 0, so torchrun ends as for
    a finished run; this process then returns 128 + the signal's number, as a process
    the signal stopped would (or OUT_OF_TIME, for ranks that --time-limit stopped, which
    counts from `started_at`)."""
    import contextlib
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "streamer", *rest]
    existed, stopped_before, rows_before = out.exists(), stop_record(out), metrics_rows(out)
    ready = Path(tempfile.mkdtemp(prefix="streamer-ranks-"))
    torchrun = subprocess.Popen(cmd, start_new_session=True,
                                env={**os.environ, STARTED_AT: repr(started_at), READY_DIR: str(ready)})
    relay = RankSignals(torchrun.pid, ready)
    previous = {signum: signal.signal(signum, relay.receive)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    try:
        while (code := torchrun.poll()) is None:  # a signal before the ranks start waits for them
            time.sleep(0.1)
            relay.pass_on()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(ready, ignore_errors=True)
    stopped = stop_record(out)
    if code == 0 and stopped and stopped != stopped_before:  # this job's stop, not the last one's
        with contextlib.suppress(KeyError, TypeError):
            return 128 + signal.Signals[stopped["signal"]] if stopped["signal"] else OUT_OF_TIME
    return stopped_outside_steps(relay.received[0], out, existed, rows_before) if relay.received else code


class RankSignals:
    """The launcher's signals, passed on to torchrun's ranks once each is ready to take
    them (see [Note: a signal before the steps]), each signal once: a second one would
    stop the ranks at once."""

    def __init__(self, torchrun_pid: int, ready: Path) -> None:
        self.torchrun_pid, self.ready = torchrun_pid, ready
        self.received: list[int] = []  # as the ranks get them (SIGHUP as SIGTERM)
        self.pending: list[int] = []  # not yet passed on

    def receive(self, signum: int, frame: object) -> None:
        import signal

        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        self.received.append(sent)
        self.pending.append(sent)
        self.pass_on()

    def pass_on(self) -> None:
        import contextlib
        import time

        import psutil

        if not self.pending:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            ranks = psutil.Process(self.torchrun_pid).children()
            # A rank in its first moments has yet to reach the code that takes a signal
            # quietly (streamer/__main__.py, which then marks itself ready): Python would
            # die of it, and torchrun report.
            if any(not (self.ready / str(rank.pid)).exists() and rank.create_time() > time.time() - READY_WAIT_S
                   for rank in ranks):
                return
            while ranks and self.pending:
                sent = self.pending.pop(0)
                for rank in ranks:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        rank.send_signal(sent)


def stop_record(out: Path) -> dict | None:
    """The stop run.json records (the signal or time limit that last stopped the run), if any."""
    try:
        stopped = json.loads((out / "run.json").read_text()).get("stopped")
    except (OSError, ValueError, AttributeError):
        return None
    return stopped if isinstance(stopped, dict) else None


# [Note: a signal before the steps]
# A signal stops a run's steps in good order (streamer.train's [Note: stopping on a
# signal]), but the ranks install those handlers only when their steps begin. Before
# that (imports, the store's filling, minutes for 20B) and after them (the final
# export), the launcher's ranks (streamer/__main__.py) take SIGINT, SIGTERM and
# SIGUSR1 as an interruption and exit 0, quietly, rather than each print a traceback
# and torchrun its report of failed ranks. A signal that comes before torchrun has
# started the ranks waits for them, and for each to mark itself ready (a file named by
# its pid in `READY_DIR`) once it has reached that code: an interpreter still starting
# would die of the signal, as Python's default does. The launcher
# then says, once, what the signal stopped, and exits 128 + its number, as for a stop
# within the steps (a stop run.json recorded before this job is not this one's). A run
# that had not begun its first step leaves nothing: its store is removed by its lead
# (`train`), and its --out folder, new to this launch, here.
def stopped_outside_steps(signum: int, out: Path, existed: bool, rows_before: int) -> int:
    """The launcher's report of ranks a signal stopped outside their steps (see the note),
    before this job's first step or after its last, told apart by the metrics rows (a resume
    drops those past its checkpoint, none are added before its first step)."""
    import shutil
    import signal

    rows = metrics_rows(out)
    if not rows and not existed:
        shutil.rmtree(out, ignore_errors=True)
    resume = f"`streamer train --out {out} --resume` goes on from its last checkpoint"
    where = ("during its start-up, before its first step: nothing was trained" if not rows else
             f"during its start-up, before this job's first step: {resume}" if rows <= rows_before else
             f"after its steps, as it wrote its final weights: {resume}")
    print(f"streamer: {signal.Signals(signum).name} stopped the run {where}", file=sys.stderr)
    return 128 + signum


def metrics_rows(out: Path) -> int:
    """How many steps the run in `out` has logged."""
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    from streamer.train import TrainConfig

    return TrainConfig(
        model=args.model, vocab_size=args.vocab_size, mode=args.mode, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup=args.warmup, schedule=args.schedule, decay_fraction=args.decay_fraction,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        data=args.data[0] if args.data and len(args.data) == 1 else args.data, data_weights=args.data_weights,
        document_mask=args.document_mask,
        out=args.out, device=args.device, dtype=args.dtype, offload=args.offload, store_dir=args.store_dir,
        prefetch_depth=args.prefetch_depth, held_units=args.held_units, recompute=args.recompute,
        max_memory_gib=args.max_memory,
        host_memory_gib=args.host_memory,
        state=args.state, update_on=args.update_on,
        grad_sync=args.grad_sync,
        progress=not args.no_progress, save_final=args.save_final,
        checkpoint_every=args.checkpoint_every, keep=args.keep, keep_every=args.keep_every,
        resume=args.resume, max_skipped_steps=args.max_skipped_steps,
        time_limit_s=duration(args.time_limit) if args.time_limit else 0.0,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, holdout=args.holdout, init_from=args.init_from,
        eval_data=args.eval_data[0] if args.eval_data and len(args.eval_data) == 1 else args.eval_data,
    )


# [Note: resuming with the run's settings]
# `streamer train --out DIR --resume` goes on with the run as it was: every train flag
# the command leaves out takes the value the run recorded, in its newest checkpoint's
# manifest (or, before its first checkpoint, in run.json), and a flag that is given wins
# (check_compatible then reports the change). So a job script that repeats its whole
# command resumes as before, and a person need not retype twenty flags. Not taken from
# the record: what belongs to this job, not to the run: --out and --resume themselves,
# --no-progress, and the wall time of --time-limit. --nproc is taken as the run's number
# of processes, except inside a torchrun of the user's own, which has fixed it already.
# The record holds paths absolute (TrainConfig.record), so the same files are found
# from any directory. A launcher passes what it filled to its ranks as flags, so they
# cannot read a different record.
_OF_THE_JOB = ("out", "resume", "no_progress", "dry_run", "time_limit", "nproc")
_RECORDED_AS = {"max_memory": "max_memory_gib", "host_memory": "host_memory_gib"}
# The stream engine's settings, which a resident run refuses: not taken from a resident
# run's record, whose values for them (a default of its day: --update-on host, say) it
# never used.
_STREAM_ONLY = ("offload", "prefetch_depth", "held_units", "recompute", "max_memory", "state", "update_on",
                "store_dir")


def train_parser() -> argparse.ArgumentParser:
    probe = _Parser(prog="streamer")
    sub = probe.add_subparsers(dest="command", parser_class=_Parser)
    _add_train(sub)
    return sub.choices["train"]


def given_flags(train_argv: list[str]) -> set[str]:
    """The destinations of the train flags the command line gives, whatever their values
    (an abbreviated flag included, as argparse reads it)."""
    parser = train_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(train_argv)))


def recorded_run(out: Path) -> tuple[dict, int, Path | None] | None:
    """The settings and number of processes the run in `out` recorded last, and the
    checkpoint that recorded them: its newest checkpoint's, or run.json's when it has
    none (no checkpoint then); None when it recorded nothing."""
    from streamer.checkpoint import newest_manifest

    found = newest_manifest(out)
    try:
        record = found[1] if found else json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    settings = record.get("train") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        return None
    return settings, int(record.get("world", 1)), found[0] if found else None


def resume_settings(args: argparse.Namespace, given: set[str]) -> dict[str, object]:
    """--resume: the recorded values of the train flags the command leaves out, by
    destination (see [Note: resuming with the run's settings])."""
    found = recorded_run(Path(args.out)) if args.resume and args.out else None
    if found is None:
        return {}
    settings, world, checkpoint = found
    filled: dict[str, object] = {}
    for action in train_parser()._actions:
        dest = action.dest
        key = _RECORDED_AS.get(dest, dest)
        if dest in given or dest in _OF_THE_JOB or key not in settings:
            continue
        if dest in _STREAM_ONLY and settings.get("mode") == "resident" and "mode" not in given:
            continue
        value = settings[key]
        filled[dest] = [value] if isinstance(value, str) and action.nargs == "+" else value
    if "nproc" not in given and "WORLD_SIZE" not in os.environ:
        filled["nproc"] = world
    # An architecture a folder of weights named (--model DIR, or --init-from's), the
    # folder since moved or deleted: the checkpoint the run goes on from names it too.
    model, init_from = filled.get("model", args.model), filled.get("init_from", args.init_from)
    named_by = model if model is not None else init_from
    if checkpoint is not None and isinstance(named_by, str) and not Path(named_by).exists() and (
            model is None or os.sep in model):
        filled["model"] = str(checkpoint)
    return filled


def as_flags(values: dict[str, object], changed_only: bool = False) -> list[str]:
    """Train flags that set `values` ({destination: value}); with `changed_only`, those
    whose value is not the default."""
    parser = train_parser()
    words = []
    for action in parser._actions:
        if action.dest not in values or (changed_only and values[action.dest] == parser.get_default(action.dest)):
            continue
        value = values[action.dest]
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0 if value else 1])
        elif isinstance(value, list):
            words += [action.option_strings[0], *map(str, value)]
        elif value is not None:
            words += [action.option_strings[0], str(value)]
    return words


def recorded_notice(args: argparse.Namespace) -> str | None:
    """The line that says what a resume took from the run's record (None: nothing)."""
    if not args.filled:
        return None
    shown = as_flags(args.filled, changed_only=True)
    return f"resuming {args.out} with the settings it recorded{': ' if shown else ''}{' '.join(shown)}"


def launch_train(args: argparse.Namespace, argv: list[str]) -> int:
    """Check everything that can be checked in this process, so a bad input is one line
    here rather than one per rank, then start the ranks with one shared --out."""
    from streamer.train import preflight

    if args.nproc <= 0:
        raise UserError(f"--nproc must be a positive integer, got {args.nproc}")
    checked = preflight(train_config(args), world=args.nproc)
    if args.out is None:  # ranks started a second apart must not pick different folders
        argv = [*argv, "--out", str(checked.out)]
    # What a resume took from the record, given to the ranks as flags: each would
    # otherwise read the record itself, and a checkpoint being pruned could make them differ.
    argv += as_flags({dest: value for dest, value in args.filled.items() if dest != "nproc"})
    if args.filled:
        print(recorded_notice(args))
    return launch(args.nproc, argv, checked.out, args.started_at)


def cmd_train(args: argparse.Namespace) -> None:
    from streamer.train import train

    out = train(train_config(args), started_at=args.started_at, announce=recorded_notice(args))
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final = ("not exported (--no-save-final)" if not args.save_final
                 else f"in {out / 'final'} (`streamer sample {out}` continues a prompt with them, "
                      f"`streamer eval {out}` measures their loss)")
        evals = [row for row in rows if "eval_loss" in row]
        held_out = (f", held-out loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}"
                    if len(evals) > 1 else f", held-out loss {evals[0]['eval_loss']:.3f}" if evals else "")
        print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} over {len(rows)} steps{held_out}; "
              f"metrics in {out / 'metrics.jsonl'}, final weights {final}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from streamer.parallel import end_process

        end_process()  # a torchrun rank: see there


def cmd_prepare(args: argparse.Namespace) -> None:
    from streamer.data import JsonLines, prepare

    if args.eval_fraction is not None and args.eval_out is None:
        raise UserError("--eval-fraction is the share of the documents held out into --eval-out: add --eval-out FILE")
    meta = prepare(args.out, args.inputs or None, args.tokenizer, args.train_tokenizer,
                   progress=not args.no_progress, separator=args.separator,
                   lines=JsonLines.parse(args.text_field, args.where), eval_out=args.eval_out,
                   eval_fraction=0.01 if args.eval_fraction is None else args.eval_fraction)
    learned = f", with the tokenizer it learned: {meta['tokenizer']}" if args.train_tokenizer else ""
    if args.train_tokenizer and meta["vocab_size"] < args.train_tokenizer:  # the text ran out of pairs to merge
        learned += (f" (of {meta['vocab_size']:,} tokens, not the {args.train_tokenizer:,} asked for: the text "
                    "holds no more pairs to merge)")
    separated = f", each document followed by token {meta['separator']}" if meta["separator"] is not None else ""
    left_out = f" (left out: {meta['n_skipped']:,} hidden, compiled or binary files)" if meta.get("n_skipped") else ""
    held = ""
    if args.eval_out is not None:
        held_meta = json.loads(Path(str(args.eval_out) + ".json").read_text())
        held = (f"; held out {held_meta['n_tokens']:,} tokens from {held_meta['n_documents']:,} "
                f"document{'s' * (held_meta['n_documents'] != 1)} to {args.eval_out} (for train --eval-data)")
    print(f"wrote {meta['n_tokens']:,} tokens ({meta['dtype']}, vocab {meta['vocab_size']}) "
          f"from {meta['n_documents']:,} document{'s' * (meta['n_documents'] != 1)} in {meta['n_files']} "
          f"file{'s' * (meta['n_files'] != 1)} to "
          f"{args.out}{separated}{learned}{left_out}{held}")


def cmd_models(args: argparse.Namespace) -> None:
    from models import REGISTRY, ModelConfig

    rows = []
    for name in REGISTRY:
        c = ModelConfig.from_name(name)
        rows.append({"name": name, "family": c.family, "n_layer": c.n_layer, "d_model": c.d_model,
                     "n_head": c.n_head, "context": c.block_size, "vocab": c.vocab_size, "n_params": c.n_params()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<14}{'family':<8}{'layers':>7}{'d_model':>9}{'heads':>7}{'context':>9}{'params':>17}")
    for r in rows:
        print(f"{r['name']:<14}{r['family']:<8}{r['n_layer']:>7}{r['d_model']:>9}{r['n_head']:>7}"
              f"{r['context']:>9}{r['n_params']:>17,}")


def _before_training(args: argparse.Namespace, argv: list[str]) -> int | None:
    """What `train` does before its handler: --resume's settings from the run's record
    (into `args`, and `args.filled`), --dry-run, and under --nproc the launcher; an exit
    status when that is all there is to do, else None."""
    args.filled = resume_settings(args, given_flags(argv[1:])) if args.resume else {}
    vars(args).update(args.filled)
    if args.dry_run:
        from streamer.train import dry_run

        lines = dry_run(train_config(args), world=args.nproc)
        print("\n".join([recorded_notice(args)] * bool(args.filled) + lines))
        return 0
    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        return launch_train(args, argv)
    return None


def main(argv: list[str] | None = None) -> int:
    """`streamer`: a Ctrl-C (SIGINT) from the first moment ends it without a traceback,
    torch's import of a second and more included: this module imports torch only
    for the commands that need it."""
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        if os.environ.get(STARTED_AT) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise  # a launched rank: streamer/__main__.py ends it ([Note: a signal before the steps])
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"streamer: interrupted{'' if signum == signal.SIGINT else ' by ' + signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + signum


def _main(argv: list[str] | None) -> int:
    import time

    # When the command started: `train --time-limit` counts from here, and under --nproc
    # from the launcher's start, which it passes to the ranks.
    started_at = float(os.environ.get(STARTED_AT, "0")) or time.time()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        argv = ["train", *argv]
        args = parser.parse_args(argv)
    args.started_at = started_at
    # Outside the steps, a run's stop signals act as Ctrl-C does (put back when the
    # command returns: main runs in other programs too, as the tests' process).
    previous = interrupt_on(signal.SIGTERM, signal.SIGUSR1) if args.command == "train" else {}
    try:
        return _run_command(args, argv)
    finally:
        for signum, was in previous.items():
            signal.signal(signum, was)


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """The command's handler, its errors made the exit status and one line."""
    from models.safety import UnsafeFileError

    handlers = {"train": cmd_train, "prepare": cmd_prepare, "models": cmd_models}
    if args.command == "plan":
        from streamer.planner import cmd_plan as handler
    elif args.command == "sample":
        from streamer.sample import cmd_sample as handler
    elif args.command == "eval":
        from streamer.evaluate import cmd_eval as handler
    elif args.command == "status":
        from streamer.status import cmd_status as handler
    elif args.command == "export":
        from streamer.export import cmd_export as handler
    else:
        handler = handlers[args.command]
    try:
        code = _before_training(args, argv) if args.command == "train" else None
        if code is not None:
            return code
        handler(args)
    except (UserError, UnsafeFileError) as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # a training run a signal or its time limit stopped after a step
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"streamer: {exc}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from streamer.parallel import end_process

            end_process()  # status 0, so that torchrun lets every rank finish (see `launch`)
        return exc.status
    except BrokenPipeError:
        # The reader of our output left (`streamer status run | head -2`): stop as a
        # command killed by SIGPIPE would, without Python's error at exit flushing stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
