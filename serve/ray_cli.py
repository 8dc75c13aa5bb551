"""The `--ray` flags of `vlm caption` / `vlm score` and their dispatch (imports neither Ray nor torch).

`vlm caption ... --ray [ADDRESS]` runs the same work on Ray Data (`vlm.serve.ray_run`): without
an address on a local Ray instance, else on the cluster at ADDRESS. Ray comes with the optional
extra: `pip install 'vlm[ray]'`.
"""

from __future__ import annotations

import argparse
import re

from vlm.errors import VLMError

from .batch_run import positive

# host:port, [v6]:port, ray://host:port, or the words Ray itself understands.
_ADDRESS = re.compile(r"^(?:local|auto|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+)$")
RAY_HELP = """\
The same rows, computed by Ray Data actors (one model copy each) on a local Ray instance (no
ADDRESS, or 'local': one actor per CPU) or a cluster ('auto' for the cluster this machine belongs
to, ray://HEAD:10001, HEAD:6379). --out then names a folder of shards (part-*.jsonl, or .parquet
with --shard-format parquet): `cat OUT/part-*.jsonl` gives one file. INPUT may also be a Parquet
file, a folder named *.parquet or a URI of a Parquet dataset, with an 'image' column of paths or
URIs (plus 'prompt', 'question' or 'text'). Images are read, and shards written, on the workers:
on a cluster, use a filesystem mounted at the same path on every node. A rerun skips what the
shards hold; an actor that dies has its chunk redone and every input still ends in exactly one
row. Put --ray after the INPUTs or write --ray=ADDRESS (a bare --ray followed by an INPUT would
take it for an address). --num-workers does not apply: actors decode their own images.
"""


def ray_address(text: str) -> str:
    """`--ray`'s value: a Ray address, never an INPUT swallowed by the optional argument."""
    if not _ADDRESS.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Ray address (local, auto, ray://HOST:10001, HOST:6379); "
            "put --ray after the INPUTs or write --ray=ADDRESS")
    return text


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]` and the flags that only apply with it (all None unless given)."""
    g = p.add_argument_group("Ray Data (with --ray; pip install 'vlm[ray]')", RAY_HELP)
    g.add_argument("--ray", nargs="?", const="local", type=ray_address, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray instance, or the cluster at ADDRESS; --out is then a folder")
    g.add_argument("--concurrency", type=positive,
                   help="actors, one model copy each (default: the CPUs / --num-cpus, or the GPUs / --num-gpus)")
    g.add_argument("--num-cpus", type=float, help="CPUs per actor (default 1; also its torch threads)")
    g.add_argument("--num-gpus", type=float, help="GPUs per actor (default 0)")
    g.add_argument("--shard-size", type=positive, help="inputs per chunk of work and shard file (default 1000)")
    g.add_argument("--shard-format", choices=["jsonl", "parquet"], help="shard files (default jsonl)")


RAY_ONLY = ("concurrency", "num_cpus", "num_gpus", "shard_size", "shard_format")


def ray_main(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int | None:
    """Run `command` ("caption" or "score") on Ray when `--ray` was given; None otherwise."""
    if args.ray is None:
        for dest in RAY_ONLY:
            if getattr(args, dest) is not None:
                parser.error(f"--{dest.replace('_', '-')} needs --ray")
        return None
    if args.out is None:
        parser.error("--out is required with --ray (a folder for the shards)")
    if getattr(args, "format", None) not in (None, "jsonl"):
        parser.error(f"--ray writes shards (--shard-format jsonl or parquet), not --format {args.format}")
    import_ray()  # before anything heavy: without the extra, --ray is one line
    from .ray_run import run

    return run(args, command)


def import_ray():
    """The `ray` module with Ray Data, or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise VLMError("--ray needs Ray Data, an optional extra: pip install 'vlm[ray]'") from None
    return ray
