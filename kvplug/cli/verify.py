"""``kvplug verify SSD_PATH [--drop-bad]``: check every block of an SSD tier directory.

Exit status 0: every block is sound; 1: the store was not sound when
checked: some blocks are bad (listed), also when --drop-bad then dropped
them all (it says so; a second run exits 0); 2: the directory could not be
checked (in use by a running engine, unsafe, missing, no kvplug manifest in
it, or a manifest SQLite cannot read).
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check every SSD-tier block's checksum (and MAC); exit 0 sound, 1 bad, "
                       "2 not checked",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ssd_path", help="the directory given as ssd_path / --kvplug-ssd-path (stop its engine first)")
    p.add_argument("--drop-bad", action="store_true", help="delete the bad blocks' manifest rows (their slots "
                   "are reused); without it nothing is changed. The exit status is still 1 when there were bad "
                   "blocks: it says what was found, and the output what was dropped")
    p.add_argument("--integrity-key", metavar="REF", help="env:NAME or file:/path, as in the config: check MACs too")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from kvplug.config import ConfigError, KVPlugConfig
    from kvplug.tiers.ssd_dir import DirectoryBusy, UnsafeDirectory
    from kvplug.tiers.ssd_verify import NotAStore, verify

    try:
        secret = KVPlugConfig.load({"integrity_key": args.integrity_key}).integrity_secret() \
            if args.integrity_key else None
        report = verify(args.ssd_path, drop_bad=args.drop_bad, integrity_key=secret)
    except (ConfigError, DirectoryBusy, UnsafeDirectory, NotAStore, OSError) as e:
        print(f"kvplug verify: {e}")
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(f"{report.path}: {report.blocks} blocks of {report.block_bytes:,} bytes: {report.sound} sound, "
              f"{len(report.bad)} bad" + (f" ({', '.join(f'{k}: {n}' for k, n in report.problems.items())})"
                                          if report.bad else ""))
        for key, problem in report.bad[:20]:
            print(f"  bad block {key.hex() if isinstance(key, bytes) else key!r}: {problem}")
        if len(report.bad) > 20:
            print(f"  ... and {len(report.bad) - 20} more")
        if report.mac_unchecked:
            print(f"  {report.mac_unchecked} blocks carry a MAC; without --integrity-key only their checksum "
                  f"was checked")
        if report.dropped:
            print(f"dropped {report.dropped} bad blocks from the manifest: the store holds only sound blocks now "
                  f"(exit status 1: it was not sound when checked)")
    return 1 if report.bad else 0
