"""Input and output files (vmm/files.py): no output ever overwrites an input (by device and
inode: symlinks and hard links too), inputs are regular files read whole within a bound,
and nothing a FIFO or a device does can hang a command."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.vtlrun import REPO, SAFETY_TIMEOUT, vtl_cli
from vmm.files import InputFileError, OutputFileError, open_output, read_input


def _one_line(cp: subprocess.CompletedProcess[str]) -> str:
    err = cp.stderr.strip()
    assert "Traceback" not in cp.stdout + cp.stderr and len(err.splitlines()) == 1, cp.stderr
    return err


# ---- the rule itself --------------------------------------------------------------------------
def test_an_output_is_refused_if_it_is_an_input_by_any_name(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"precious")
    (tmp_path / "link").symlink_to(src)
    os.link(src, tmp_path / "hard")
    assert read_input(tmp_path / "link", "--stage", 100) == b"precious"
    for name in ("in.bin", "link", "hard"):
        with pytest.raises(OutputFileError, match="refusing to overwrite"):
            open_output(tmp_path / name, "--events")
    assert src.read_bytes() == b"precious"
    with open_output(tmp_path / "other", "--events") as f:     # any other file is written
        f.write("x\n")
    assert (tmp_path / "other").read_text() == "x\n"


def test_a_deleted_input_s_inode_number_does_not_refuse_a_new_file(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    read_input(src, "--trust", 100)
    ino = src.stat().st_ino
    src.unlink()
    for i in range(50):                          # the file system may hand the number out again
        new = tmp_path / f"out{i}"
        with open_output(new, "--events") as f:
            f.write("ok\n")
        if new.stat().st_ino == ino:
            break


def test_inputs_must_be_regular_and_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(101))
    with pytest.raises(InputFileError, match="more than the 100"):
        read_input(big, "--stage", 100)
    with pytest.raises(InputFileError, match="character device"):
        read_input("/dev/zero", "--trust", 1 << 20)
    with pytest.raises(InputFileError, match="directory"):
        read_input(tmp_path, "--trust", 1 << 20)
    with pytest.raises(InputFileError, match="no such file"):
        read_input(tmp_path / "missing", "--trust", 1 << 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="FIFO"):        # does not block without a writer
        read_input(fifo, "--stage", 1 << 20)


def test_a_fifo_output_is_refused_without_blocking_reader_or_not(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputFileError, match="nobody reads"):
        open_output(fifo, "--events")
    # With a reader it is still refused: a reader that stops reading would stall the run.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OutputFileError, match="FIFO"):
            open_output(fifo, "--events")
    finally:
        os.close(fd)
    with open_output("/dev/null", "--events") as f:          # a character device is fine
        f.write("x\n")


# ---- through the CLI, on real KVM ------------------------------------------------------------
@pytest.mark.kvm
@pytest.mark.parametrize("flag", ["--stage", "--trust"])
@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_events_never_overwrites_what_run_reads(guest_images: tuple[Path, Path], tmp_path: Path,
                                                flag: str, alias: str) -> None:
    src = tmp_path / "K.elf"                  # an ELF: --trust measures it, --stage places it
    content = guest_images[0].read_bytes()
    src.write_bytes(content)
    out = src
    if alias == "symlink":
        out = tmp_path / "ev.jsonl"
        out.symlink_to(src)
    elif alias == "hardlink":
        out = tmp_path / "ev.jsonl"
        os.link(src, out)
    cp = vtl_cli("run", flag, str(src), "--events", str(out), "--timeout", "20")
    assert cp.returncode == 1, cp.stderr
    assert "refusing to overwrite" in _one_line(cp)
    assert src.read_bytes() == content


@pytest.mark.kvm
@pytest.mark.parametrize("args,needle", [
    (("--trust", "/dev/zero"), "--trust /dev/zero is a character device"),
    (("--stage", "/dev/zero"), "--stage /dev/zero is a character device"),
    (("--stage", "{fifo}"), "is a FIFO"),
    (("--trust", "{fifo}"), "is a FIFO"),
    (("--vtl0-image", "{fifo}"), "is a FIFO"),
    (("--vtl1-image", "/dev/zero"), "character device"),
    (("--events", "{fifo}"), "nobody reads"),
    (("--events", "{dir}"), "Is a directory"),
])
def test_non_regular_files_are_refused_in_one_line(tmp_path: Path, args: tuple[str, str],
                                                    needle: str) -> None:
    """These hung forever (ignoring --timeout): /dev/zero read whole, a FIFO opened without
    a writer or reader."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    value = args[1].format(fifo=fifo, dir=tmp_path)
    cp = vtl_cli("run", args[0], value, "--timeout", "20", timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 1, cp.stderr
    assert needle in _one_line(cp)


@pytest.mark.kvm
def test_events_to_the_file_stdout_writes_to_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "w") as out:
        cp = subprocess.run([sys.executable, "-m", "vtl", "run", "--events", "/dev/stdout"], cwd=REPO,
                            text=True, stdout=out, stderr=subprocess.PIPE, timeout=SAFETY_TIMEOUT)
    err = cp.stderr.strip()
    assert cp.returncode == 1 and "standard output" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and log.read_text() == ""


@pytest.mark.kvm
def test_events_to_dev_null_still_runs(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("run", "--quiet", "--events", os.devnull, timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 0, cp.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("target", ["dir", "/dev/full", "image", "fifo"])
def test_memmap_png_that_cannot_be_written_is_one_line_and_status_1(
        guest_images: tuple[Path, Path], tmp_path: Path, target: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = {"dir": str(tmp_path), "image": str(guest_images[0]), "fifo": str(fifo)}.get(target, target)
    before = guest_images[0].read_bytes()
    cp = vtl_cli("memmap", "--png", path, timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert "--png" in _one_line(cp) and "picture:" not in cp.stdout
    assert list(tmp_path.iterdir()) == [fifo]            # nothing written beside the directory
    assert guest_images[0].read_bytes() == before


def test_a_blocked_fifo_never_holds_a_reader_thread(tmp_path: Path) -> None:
    """read_input on a FIFO returns at once even while a writer holds it open."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    done = threading.Event()

    def read() -> None:
        with pytest.raises(InputFileError):
            read_input(fifo, "--stage", 1 << 20)
        done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    os.close(wfd)
    os.close(rfd)
    assert done.is_set()
