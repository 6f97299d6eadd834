"""tools/fw: build, sign, verify round trip; tampering found; key file modes; CLI errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tools.cli import main
from tools.fw import image, keys


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keys.KeyPaths]:
    root = tmp_path_factory.mktemp("fw")
    paths = keys.keygen(root / "keys")
    img = root / "img"
    image.build_image("sim", 5, img, display="0.5.0")
    image.sign_image(img, keys.load_private(paths.private))
    return img, paths


def test_round_trip_and_canonical_manifest(signed: tuple[Path, keys.KeyPaths]) -> None:
    img, paths = signed
    m = image.verify_image(img, keys.load_public(paths.public))
    assert (m.version, m.display, m.board, m.key_id) == (5, "0.5.0", "sim", paths.key_id)
    names = {f.path for f in m.files}
    assert {"main.mpy", "app.mpy", "board.mpy", "proto.mpy", "simflash.mpy"} <= names
    assert not names & {f"{b}.mpy" for b in image.BOOTLOADER_MODULES}
    data = (img / image.MANIFEST).read_bytes()
    assert b" " not in data and image.Manifest.from_bytes(data).to_bytes() == data
    assert len((img / image.SIGNATURE).read_bytes()) == 64


def test_tampering_is_found(signed: tuple[Path, keys.KeyPaths], tmp_path: Path) -> None:
    img, paths = signed
    pub = keys.load_public(paths.public)
    for case in ("file", "manifest", "missing", "other_key"):
        copy = tmp_path / case
        copy.mkdir()
        for f in img.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        if case == "file":
            (copy / "app.mpy").write_bytes(b"X" + (copy / "app.mpy").read_bytes()[1:])
        elif case == "manifest":
            data = (copy / image.MANIFEST).read_bytes().replace(b'"version":5', b'"version":6')
            (copy / image.MANIFEST).write_bytes(data)
        elif case == "missing":
            (copy / "main.mpy").unlink()
        with pytest.raises(image.ImageError):
            other = keys.keygen(tmp_path / "k2") if case == "other_key" else None
            image.verify_image(copy, keys.load_public(other.public) if other else pub)


def test_private_key_is_0600_and_refused_when_readable(tmp_path: Path) -> None:
    paths = keys.keygen(tmp_path)
    assert stat.S_IMODE(paths.private.stat().st_mode) == 0o600
    with pytest.raises(keys.KeyFileError):
        keys.keygen(tmp_path)  # never overwrites
    paths.private.chmod(0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load_private(paths.private)


def test_esp32_image_is_native_code(tmp_path: Path) -> None:
    m = image.build_image("esp32", 1, tmp_path)
    assert {"board.mpy", "_esp32_common.mpy", "_wlan.mpy", "_sht4x.mpy"} <= {f.path for f in m.files}
    print(f"\nesp32 image: {len(m.files)} files, {m.total_size} bytes of .mpy")


def test_flash_ships_the_board_module_with_every_helper_it_imports() -> None:
    # Without a bootloader, torpor flash writes the app and the board's modules to /lib.
    from tools.flash import image_files

    for board, helpers in (("pico_w", {"_rp2_common", "_wlan", "_sht4x"}),
                           ("esp32c3", {"_esp32_common", "_wlan", "_sht4x"})):
        names = {f.remote for f in image_files(board)}
        assert {f"/lib/{h}.mpy" for h in helpers | {"board", "app", "mqtt"}} <= names, board
        assert "/main.py" in names and "/lib/pico_w.mpy" not in names


def test_cli(signed: tuple[Path, keys.KeyPaths], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, paths = signed
    assert main(["fw", "verify", "--pubkey", str(paths.public), str(img)]) == 0
    assert "ok: sim v5" in capsys.readouterr().out
    assert main(["fw", "verify", "--pubkey", str(paths.public), str(tmp_path)]) == 2
    assert "not an image directory" in capsys.readouterr().err
    assert main(["fw", "sign", "--key", str(tmp_path / "nope.key"), str(img)]) == 2
    assert main(["fw", "keygen", "--out", str(tmp_path / "k")]) == 0
    assert main(["fw", "build", "--board", "sim", "--version", "0", "--out", str(tmp_path / "b")]) == 2
    with pytest.raises(SystemExit):
        main(["fw", "build", "--board", "nosuch", "--version", "1", "--out", str(tmp_path)])
