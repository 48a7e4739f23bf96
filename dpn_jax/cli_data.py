"""``dpn-jax data list | download | prepare | verify``: the built-in datasets' files, their
encoding and the integrity of the encoded-split cache."""

from __future__ import annotations

import argparse
import time


def add_data_parser(sub) -> None:
    from dpn_jax.data.catalog import CATALOG

    names = ", ".join(CATALOG)
    d = sub.add_parser("data", help="list, download and prepare the built-in (paper) datasets",
                       description="Sources and licences: `dpn-jax data list`.")  # fmt: skip
    dsub = d.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("list", help="every downloadable dataset: folder, source, size, licence")
    g = dsub.add_parser(
        "download", help="fetch a dataset's files into DIR/<folder>/ (resumes, verifies checksums)",
        description=f"Datasets: {names}. Fetches from each dataset's public location (see "
                    "`dpn-jax data list` for sources and licences), resumes partial downloads, "
                    "verifies published checksums, unpacks archives. Without network access it "
                    "stops with an error after --timeout seconds, never hangs.")  # fmt: skip
    g.add_argument("name", help=f"one of: {names}")
    g.add_argument("--to", required=True, metavar="DIR", help="the data dir (files go to DIR/<folder>/)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation (default 30)")
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p = dsub.add_parser(
        "prepare", help="encode a dataset into the cache (streaming, bounded memory, progress bar)",
        description="Reads the raw files from --data-dir/<folder>/ and writes the encoded splits to "
                    "the dataset cache; `train --data NAME` then starts at once.")  # fmt: skip
    p.add_argument("name", help="a built-in dataset name (see `dpn-jax data list`)")
    p.add_argument("--data-dir", default=None, help="the data dir (default: $DPN_DATA_DIR, then ../shared/data)")
    p.add_argument("--cache-dir", default=None, help="encoded-split cache (default: $DPN_CACHE_DIR or ~/.cache/dpn_jax)")
    p.add_argument("--seed", type=int, default=2021, help="seed of a random split (raw criteo/avazu)")
    p.add_argument("--min-count", type=int, default=None,
                   help="override the dataset's standard rare-category threshold")
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip lines with a wrong column count (counted and reported) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    v = dsub.add_parser(
        "verify", help="check every byte of the encoded-split cache against its checksums",
        description="Every load checks each cached array's size, header and a sample of its "
                    "blocks, and every id against the schema; this hashes every byte. With --data, "
                    "that dataset's cache (a damaged one is re-encoded); without, every cache in "
                    "--cache-dir (a damaged one is removed: the next use encodes it again). Exit "
                    "status 1 when damage was found.")  # fmt: skip
    v.add_argument("--data", default=None,
                   help="a built-in name or a dataset spec (.yaml) (default: every cached dataset)")
    v.add_argument("--data-dir", default=None, help="the data dir (default: $DPN_DATA_DIR, then ../shared/data)")
    v.add_argument("--cache-dir", default=None, help="encoded-split cache (default: $DPN_CACHE_DIR or ~/.cache/dpn_jax)")


def cmd_verify(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from dpn_jax.data import cache, load_dataset
    from dpn_jax.errors import DataError

    if args.data is None:
        root = Path(args.cache_dir).expanduser() if args.cache_dir else cache.default_cache_dir()
        dirs = sorted(p.parent for p in root.glob("*/meta.json") if not p.parent.name.startswith(".tmp-"))
        if not dirs:
            print(f"no encoded datasets in {root}")
            return 0
        damaged = 0
        for d in dirs:
            found = cache.problems(d, full=True)
            for line in found:
                print(f"damaged: {line}")
            if found:
                damaged += 1
                shutil.rmtree(d, ignore_errors=True)
                print(f"removed {d}: the next use encodes it again")
            else:
                print(f"ok: {d}")
        print(f"{len(dirs) - damaged} of {len(dirs)} cached datasets verified")
        return 1 if damaged else 0
    ds = load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    d = (ds.meta.get("cache") or {}).get("dir")
    if d is None:
        raise DataError(f"{args.data}: not cached (generated in memory), nothing to verify")
    found = cache.problems(d, full=True)
    if not found:
        print(f"ok: {d} (every byte matches its checksum; every id is in range)")
        return 0
    for line in found:
        print(f"damaged: {line}")
    del ds  # drop the memory maps before the files go
    shutil.rmtree(d, ignore_errors=True)
    ds = load_dataset(args.data, data_dir=args.data_dir, cache_dir=args.cache_dir)
    print(f"re-encoded: {ds.meta['cache']['dir']}")
    return 1


def cmd_data(args: argparse.Namespace) -> int:
    from dpn_jax.data import catalog

    if args.data_command == "list":
        print(catalog.describe())
        print("\nFiles are never redistributed by dpn-jax; each dataset carries its provider's terms.")
        return 0
    if args.data_command == "download":
        folder = catalog.download(args.name, args.to, timeout=args.timeout,
                                  progress=False if args.no_progress else None)  # fmt: skip
        print(f"{args.name}: ready in {folder}; next: dpn-jax data prepare {args.name} --data-dir {args.to}")
        return 0
    if args.data_command == "verify":
        return cmd_verify(args)
    from dpn_jax.data import TABULAR_BUILTIN, load_dataset

    opts: dict = {}
    if args.name in TABULAR_BUILTIN:
        opts = {"min_count": args.min_count, "skip_malformed": args.skip_malformed,
                "progress": False if args.no_progress else None}  # fmt: skip
    elif args.min_count is not None or args.skip_malformed:
        from dpn_jax.errors import ConfigError

        raise ConfigError(f"--min-count/--skip-malformed apply to {list(TABULAR_BUILTIN)}, not {args.name!r}")
    t0 = time.perf_counter()
    ds = load_dataset(args.name, data_dir=args.data_dir, cache_dir=args.cache_dir, seed=args.seed, **opts)
    cache = ds.meta.get("cache", {})
    state = "already prepared" if cache.get("hit") else f"prepared in {time.perf_counter() - t0:.1f} s"
    print(f"{ds.summary()}\n{state}: {cache.get('dir')}")
    if ds.meta.get("skipped_lines"):
        print(f"skipped {ds.meta['skipped_lines']:,} malformed lines")
    return 0
