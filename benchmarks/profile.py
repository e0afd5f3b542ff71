"""Where one compiled step spends its time, by kind of XLA operation.

    python -m benchmarks.profile --model resnet18 --step classifier_step [--batch_size 128]

Runs one step of ``benchmarks.compare`` under ``jax.profiler.trace``, maps each executed XLA
operation (thunk) to the optimised HLO it comes from (``--xla_dump_to``), and sums the time per
kind: convolutions, matrix products, slicing/concatenation/padding, transposes/copies, reductions
and element-wise work. Prints the totals and the largest operations of each kind.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

KINDS = (("convolution", {"convolution"}), ("matrix product", {"dot"}),
         ("reduction", {"reduce", "reduce-window", "select-and-scatter"}),
         ("transpose / copy", {"transpose", "copy"}),
         ("slice / concat / pad", {"concatenate", "slice", "pad", "dynamic-slice",
                                   "dynamic-update-slice"}))
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")


def parse_hlo(text: str) -> dict[str, tuple[set[str], str]]:
  """Instruction name -> (the opcodes it runs, fused computations included; its shape)."""
  computations, current = {}, None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(" "):
      current = computations.setdefault(match.group(1), [])
    elif current is not None:
      current.append(line)

  def opcodes(name: str, seen: frozenset = frozenset()) -> set[str]:
    found = set()
    for line in computations.get(name, []):
      match = _INSTRUCTION.match(line)
      if match:
        found.add(match.group(3))
      for called in _CALLS.findall(line):
        if called not in seen:
          found |= opcodes(called, seen | {name})
    return found

  instructions = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        called = _CALLS.findall(line)
        instructions[match.group(1)] = ({match.group(3)} | (opcodes(called[0]) if called else set()),
                                        match.group(2))
  return instructions


def kind_of(opcodes: set[str]) -> str:
  for kind, members in KINDS:
    if opcodes & members:
      return kind
  return "element-wise / other"


def op_seconds(trace_dir: str) -> collections.Counter:
  """Total seconds per executed operation name in a ``jax.profiler`` perfetto trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as file:
    events = json.load(file)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      totals[event["name"]] += event.get("dur", 0) / 1e6
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--step", default="classifier_step")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--top", type=int, default=3, help="largest operations shown per kind")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="cafd_profile_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_dump_to={work}/hlo --xla_dump_hlo_as_text")
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from benchmarks import compare  # pylint: disable=g-import-not-at-top

  run = compare.jax_steps(args.model, args.batch_size, "float32")[args.step].run
  jax.block_until_ready(run())  # compile
  with jax.profiler.trace(f"{work}/trace", create_perfetto_trace=True):
    jax.block_until_ready(run())
  instructions = {}
  for path in glob.glob(f"{work}/hlo/*after_optimizations.txt"):
    with open(path) as file:
      instructions.update(parse_hlo(file.read()))
  by_kind, largest = collections.Counter(), collections.defaultdict(list)
  for name, seconds in op_seconds(f"{work}/trace").items():
    if name in instructions:
      opcodes, shape = instructions[name]
      by_kind[kind_of(opcodes)] += seconds
      largest[kind_of(opcodes)].append((seconds, name, shape))
  total = sum(by_kind.values())
  print(f"{args.model} {args.step} batch {args.batch_size}: {total:.2f} s in XLA operations "
        f"({jax.devices()[0].platform})")
  for kind, seconds in by_kind.most_common():
    print(f"  {kind:22s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    for op_time, name, shape in sorted(largest[kind], reverse=True)[:args.top]:
      print(f"      {op_time:6.3f} s  {name}  {shape}")


if __name__ == "__main__":
  main()
