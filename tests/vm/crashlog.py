#!/usr/bin/env python3
"""Write-log crash replay for the VM tests (tests/vm/crash_replay.sh).

A dm-log-writes target records every write that reached the disk under the
image's filesystem, in the order the disk completed them, with flushes, FUA
writes and user marks. Replaying a prefix of that log onto a blank device
gives the disk as a power cut at that moment would have left it.

  crashlog.py points LOG [--max N] [--after MARK]
                                          entries to check at, one per line
  crashlog.py verdict < CHECK_JSON        exit 1 if `check --json` shows damage
  crashlog.py replay LOG TARGET --to N [--from M]
                                          apply entries [M, N) to TARGET
  crashlog.py pattern-write DEV JOURNAL GEN COUNT
                                          write generation GEN (COUNT blocks)
  crashlog.py pattern-verify DEV JOURNAL UPTO
                                          every block of generations <= UPTO
                                          holds that generation or a later one

The log format is the kernel's (drivers/md/dm-log-writes.c): a super block
at sector 0 (magic, version, entries, sector size), then per entry a header
block (sector, sectors, flags, data length; a mark's text follows the
header) and, for writes, the data, all in the device's sector size.
"""
import json
import mmap
import os
import random
import struct
import sys

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
BLOCK = 4096


class Entry:
    __slots__ = ("index", "pos", "sector", "sectors", "flags", "mark")

    def __init__(self, index, pos, sector, sectors, flags, mark):
        self.index, self.pos, self.sector = index, pos, sector
        self.sectors, self.flags, self.mark = sectors, flags, mark


def read_log(path):
    """The log's sector size and entries (headers only; data stays put)."""
    with open(path, "rb") as f:
        magic, version, count, sectorsize = struct.unpack("<QQQI", f.read(28))
        if magic != MAGIC:
            sys.exit(f"{path}: not a dm-log-writes log (magic {magic:#x})")
        if version != 1 or sectorsize not in (512, 1024, 2048, 4096):
            sys.exit(f"{path}: unsupported log (version {version}, sector size {sectorsize})")
        entries = []
        pos = sectorsize
        for i in range(count):
            f.seek(pos)
            head = f.read(sectorsize)
            if len(head) < 32:
                sys.exit(f"{path}: entry {i} of {count} cut off")
            sector, sectors, flags, datalen = struct.unpack("<QQQQ", head[:32])
            mark = head[32:32 + datalen].decode(errors="replace") if flags & MARK else None
            entries.append(Entry(i, pos, sector, sectors, flags, mark))
            pos += sectorsize
            if not flags & DISCARD:
                pos += sectors * sectorsize
    return sectorsize, entries


def cmd_points(log, max_points, after):
    """Replay points: after every flush, FUA write and mark (where the disk
    promised durability), plus evenly spread points between them; at most
    max_points, always including the first and the last. Points before the
    mark `after` are left out (the filesystem does not exist yet there).
    Each line says how many entries to replay, of how many, the kind of
    point, and per mark name ("gen-7" is name "gen", number 7) the last
    number marked before that point: `812 6046 flush fs=1 gen=3 file=9`."""
    _, entries = read_log(log)
    first = 0
    if after:
        found = [e.index + 1 for e in entries if e.mark == after]
        if not found:
            sys.exit(f"{log}: no mark {after!r}")
        first = found[0]
    late = entries[first:]
    durable = [e.index + 1 for e in late if e.flags & (FLUSH | FUA | MARK)]
    between = [e.index + 1 for e in late if not e.flags & (FLUSH | FUA | MARK)]
    step = max(1, len(between) // max(1, len(durable)))
    points = sorted(set(durable + between[::step] + [first, len(entries)]))
    if max_points and len(points) > max_points:
        keep = {points[0], points[-1]}
        stride = (len(points) - 1) / (max_points - 1)
        keep.update(points[round(k * stride)] for k in range(max_points))
        points = sorted(keep)
    marks, last = {0: {}}, {}
    for e in entries:
        if e.mark is not None and "-" in e.mark:
            name, _, num = e.mark.rpartition("-")
            if num.isdigit():
                last = dict(last, **{name: int(num)})
        marks[e.index + 1] = last
    flags = {e.index + 1: e.flags for e in entries}
    flags[0] = 0
    for p in points:
        f = flags[p]
        kind = "flush" if f & (FLUSH | FUA) else "mark" if f & MARK else "start" if p == first else "between"
        print(p, len(entries), kind, *(f"{k}={v}" for k, v in sorted(marks[p].items())))
    print(f"crashlog: {len(entries)} entries, {len(durable)} flush/FUA/mark points after {after or 'the start'}, "
          f"{len(points)} chosen", file=sys.stderr)


def cmd_verdict():
    """Reads `ublk-ploop check --json` on stdin: exit 0 unless some delta
    has header errors or bad BAT entries. An unclean close (the in-use mark
    a power cut leaves) and leaked clusters are not damage."""
    text = sys.stdin.read()
    try:
        doc = json.loads(text)
    except ValueError:
        sys.exit(f"check gave no report: {text.strip()[:200]!r}")
    damage, reports = [], []

    def walk(node):
        if isinstance(node, dict):
            if "header_errors" in node and "bad_entries" in node:
                reports.append(node)
                if node["header_errors"] or node["bad_entries"]:
                    damage.append(node.get("path", "?"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    if not reports:
        sys.exit(f"check gave no report: {text.strip()[:200]!r}")
    unclean = sum(1 for r in reports if r.get("unclean"))
    leaked = sum(r.get("leaked_clusters", 0) for r in reports)
    print(f"{len(reports)} deltas, {unclean} unclean, {leaked} leaked clusters, damaged: {damage or 'none'}")
    sys.exit(1 if damage else 0)


def cmd_replay(log, target, start, end):
    sectorsize, entries = read_log(log)
    if not 0 <= start <= end <= len(entries):
        sys.exit(f"replay range {start}..{end} outside 0..{len(entries)}")
    zero = bytes(1 << 20)
    with open(log, "rb") as src, open(target, "r+b") as dst:
        for e in entries[start:end]:
            if e.flags & MARK or e.sectors == 0:
                continue
            off, length = e.sector * sectorsize, e.sectors * sectorsize
            if e.flags & DISCARD:
                # What a discard leaves is unspecified; zeroes are one answer
                # and the harshest for a reader that relied on the old data.
                while length:
                    n = min(length, len(zero))
                    dst.seek(off)
                    dst.write(zero[:n])
                    off, length = off + n, length - n
                continue
            src.seek(e.pos + sectorsize)
            data = src.read(length)
            if len(data) != length:
                sys.exit(f"entry {e.index}: data cut off")
            dst.seek(off)
            dst.write(data)
        dst.flush()
        os.fsync(dst.fileno())


def pattern(block, gen):
    """Block `block` as generation `gen` wrote it: a header naming both and a
    fill no other (block, generation) shares."""
    head = struct.pack("<8sQQ", b"CRASHGEN", block, gen)
    return head + random.Random(block * 1_000_003 + gen).randbytes(BLOCK - len(head))


def load_journal(path):
    try:
        with open(path) as f:
            return {int(k): v for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}


def cmd_pattern_write(dev, journal_path, gen, count):
    """Write `count` random 4 KiB blocks as generation `gen` with O_DIRECT,
    then fsync the device: after fsync returns every block is durable, which
    the caller records with a log mark."""
    journal = load_journal(journal_path)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        blocks = os.lseek(fd, 0, os.SEEK_END) // BLOCK
        rng = random.Random(gen)
        # Half anywhere, half packed into a few clusters (several writes
        # to one new cluster, and clusters a lower layer already has).
        chosen = {rng.randrange(blocks) for _ in range(count // 2)}
        base = rng.randrange(blocks - 1024)
        chosen |= {base + rng.randrange(1024) for _ in range(count - len(chosen))}
        buf = mmap.mmap(-1, BLOCK)
        for b in sorted(chosen, key=lambda _: rng.random()):
            buf.seek(0)
            buf.write(pattern(b, gen))
            if os.pwrite(fd, buf, b * BLOCK) != BLOCK:
                sys.exit(f"short write at block {b}")
        os.fsync(fd)
    finally:
        os.close(fd)
    journal[gen] = sorted(chosen)
    tmp = journal_path + ".new"
    with open(tmp, "w") as f:
        json.dump(journal, f)
    os.replace(tmp, journal_path)


def cmd_pattern_verify(dev, journal_path, upto):
    """Every block written by a generation <= upto (all fsynced before the
    point being checked) reads back as its last such generation or as a
    later one (written after, maybe on disk); never older, never garbage."""
    journal = load_journal(journal_path)
    writers = {}
    for gen in sorted(journal):
        for b in journal[gen]:
            writers.setdefault(b, []).append(gen)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    checked = bad = 0
    try:
        for b, gens in sorted(writers.items()):
            durable = [g for g in gens if g <= upto]
            if os.preadv(fd, [buf], b * BLOCK) != BLOCK:
                sys.exit(f"short read at block {b}")
            data = bytes(buf)
            magic, blk, gen = struct.unpack("<8sQQ", data[:24])
            if magic == b"CRASHGEN" and blk == b and gen in gens and data == pattern(b, gen):
                ok = not durable or gen >= durable[-1]
            else:
                ok = not durable and data == bytes(BLOCK)
            if durable:
                checked += 1
            if not ok:
                bad += 1
                if bad <= 5:
                    what = f"generation {gen}" if magic == b"CRASHGEN" else "zeroes" if data == bytes(BLOCK) else "other bytes"
                    print(f"crashlog: block {b}: wanted generation >= {durable[-1] if durable else '-'}, found {what}",
                          file=sys.stderr)
    finally:
        os.close(fd)
    print(json.dumps({"flushed_blocks_checked": checked, "bad": bad}))
    sys.exit(1 if bad else 0)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "points":
        max_points = int(args[args.index("--max") + 1]) if "--max" in args else 0
        after = args[args.index("--after") + 1] if "--after" in args else ""
        cmd_points(args[0], max_points, after)
    elif cmd == "verdict":
        cmd_verdict()
    elif cmd == "replay":
        start = int(args[args.index("--from") + 1]) if "--from" in args else 0
        cmd_replay(args[0], args[1], start, int(args[args.index("--to") + 1]))
    elif cmd == "pattern-write":
        cmd_pattern_write(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "pattern-verify":
        cmd_pattern_verify(args[0], args[1], int(args[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
