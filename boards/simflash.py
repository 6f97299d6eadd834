# Flash for the sim board: a block device backed by an image file, mounted with littlefs.
# It behaves like the NOR flash of a real node: erase sets a block to 0xff, programs write
# at byte offsets, and an optional "tear" makes one write stop part-way as a power cut would.
import os
import time

import vfs
from micropython import const

_IOCTL_INIT = const(1)
_IOCTL_DEINIT = const(2)
_IOCTL_SYNC = const(3)
_IOCTL_COUNT = const(4)
_IOCTL_SIZE = const(5)
_IOCTL_ERASE = const(6)

TEAR_ENV = "TORPOR_SIMFLASH_TEAR"


class PowerCut(BaseException):
    # A BaseException so that firmware `except Exception` handlers do not swallow the cut.
    pass


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class FileBlockDev:
    """MicroPython block device (extended interface) over a file of block_count blocks.

    Counters: `prog_bytes` (bytes programmed), `erase_count` (blocks erased),
    `read_bytes`. `tear_after(n, seed)` (or env TORPOR_SIMFLASH_TEAR="<n>[:<seed>]")
    lets n more program/erase operations complete, then writes only a random prefix of the
    next one and raises PowerCut; after that every write is ignored, as on a dead node.
    """

    def __init__(self, path, block_size=4096, block_count=512):
        self.path = path
        self.block_size = block_size
        self.block_count = block_count
        self.prog_bytes = 0
        self.erase_count = 0
        self.read_bytes = 0
        self.reads = 0
        # Host time spent in this Python block device (µs): on a chip, littlefs reads and
        # programs the flash from C, so benchmarks take it out of the wake's CPU time.
        self.io_us = 0
        self._tear = -1
        self._rng = 1
        self.dead = False
        size = block_size * block_count
        self.created = not _exists(path)
        if self.created:
            blank = b"\xff" * block_size
            with open(path, "wb") as f:
                for _ in range(block_count):
                    f.write(blank)
        elif os.stat(path)[6] != size:
            raise ValueError("flash image %s is not %d bytes" % (path, size))
        self._f = open(path, "r+b")
        self._ff = b"\xff" * block_size
        spec = os.getenv(TEAR_ENV)
        if spec:
            n, _, seed = spec.partition(":")
            self.tear_after(int(n), int(seed) if seed else 1)

    def tear_after(self, ops, seed=1):
        self._tear = ops
        self._rng = (seed & 0x7FFFFFFF) or 1

    def _rand(self, n):
        # Small LCG: deterministic per seed, no dependence on the `random` module.
        self._rng = (self._rng * 1103515245 + 12345) & 0x7FFFFFFF
        return self._rng % n

    def _write(self, pos, data):
        if self.dead:
            return
        if self._tear >= 0:
            if self._tear == 0:
                self.dead = True
                cut = self._rand(len(data))
                if cut:
                    self._f.seek(pos)
                    self._f.write(memoryview(data)[:cut])
                    self._f.flush()
                raise PowerCut("torn write at byte %d of %d" % (cut, len(data)))
            self._tear -= 1
        self._f.seek(pos)
        self._f.write(data)

    def readblocks(self, block_num, buf, offset=0):
        t = time.ticks_us()
        self._f.seek(block_num * self.block_size + offset)
        self._f.readinto(buf)
        self.read_bytes += len(buf)
        self.reads += 1
        self.io_us += time.ticks_diff(time.ticks_us(), t)

    def writeblocks(self, block_num, buf, offset=None):
        t = time.ticks_us()
        try:
            self._writeblocks(block_num, buf, offset)
        finally:
            self.io_us += time.ticks_diff(time.ticks_us(), t)

    def _writeblocks(self, block_num, buf, offset):
        if offset is None:
            # Simple interface: whole blocks, erased first.
            n = len(buf) // self.block_size
            for i in range(n):
                self._erase(block_num + i)
            offset = 0
        self._write(block_num * self.block_size + offset, buf)
        self.prog_bytes += len(buf)

    def _erase(self, block_num):
        self._write(block_num * self.block_size, self._ff)
        self.erase_count += 1

    def ioctl(self, op, arg):
        if op == _IOCTL_COUNT:
            return self.block_count
        if op == _IOCTL_SIZE:
            return self.block_size
        if op == _IOCTL_ERASE:
            t = time.ticks_us()
            self._erase(arg)
            self.io_us += time.ticks_diff(time.ticks_us(), t)
            return 0
        if op == _IOCTL_SYNC:
            if not self.dead:
                self._f.flush()
            return 0
        if op == _IOCTL_INIT or op == _IOCTL_DEINIT:
            return 0
        return None

    def close(self):
        self._f.close()


def mount(image_path, mountpoint, block_size=4096, block_count=512):
    """Mount the littlefs image at mountpoint, creating and formatting it on first use.

    Returns the FileBlockDev so callers can read its write counters.
    An existing image that does not mount raises OSError rather than being reformatted.
    """
    bdev = FileBlockDev(image_path, block_size, block_count)
    if bdev.created:
        vfs.VfsLfs2.mkfs(bdev)  # type: ignore[arg-type]  # the stubs want their ABC; any block device works
    vfs.mount(filesystem(bdev), mountpoint)  # type: ignore[arg-type]
    return bdev


def filesystem(bdev):
    """The littlefs object for bdev as Torpor mounts it: without modification times.

    mtime=True (MicroPython's default) stores a timestamp attribute with every commit to a
    file; nothing on a node reads it, and without it each flushed append programs fewer
    bytes. The ports' default read/prog sizes are kept, so files up to 128 bytes stay inline.
    """
    return vfs.VfsLfs2(bdev, mtime=False)  # type: ignore[arg-type, abstract]
