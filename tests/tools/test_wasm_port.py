"""Installing the WebAssembly port without npm: a registry on loopback serves crafted metadata
and tarballs, and the install takes only the pinned version whose sha512 matches."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tools.sim.wasm_port import (
    PACKAGE,
    VERSION,
    FetchError,
    install,
    intact,
    main,
    package_dir,
    port_script,
    sri_sha512,
)

FILES = {
    "package/package.json": json.dumps({"name": PACKAGE, "version": VERSION}).encode(),
    "package/micropython.mjs": b"export default 1;\n",
    "package/micropython.wasm": bytes(range(256)) * 8,
}
META_PATH = f"/{PACKAGE.replace('/', '%2f')}/{VERSION}"
TGZ_PATH = "/tarballs/port.tgz"


def tarball(files: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = tarfile.TarInfo("package")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


class Registry:
    def __init__(self, base: str) -> None:
        self.base = base
        self.routes: dict[str, bytes] = {}
        self.requests: list[str] = []

    def publish(self, data: bytes, integrity: str | None = None, version: str = VERSION) -> None:
        self.routes[TGZ_PATH] = data
        self.routes[META_PATH] = json.dumps({
            "name": PACKAGE, "version": version,
            "dist": {"tarball": self.base + TGZ_PATH, "integrity": integrity or sri_sha512(data)},
        }).encode()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg: Registry

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reg.requests.append(self.path)
            body = reg.routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    reg = Registry(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield reg
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_installs_the_pinned_version_where_node_finds_it_then_leaves_it_alone(
    registry: Registry, tmp_path: Path
) -> None:
    registry.publish(tarball(FILES))
    assert install(tmp_path, registry.base) is True
    assert registry.requests == [META_PATH, TGZ_PATH]
    for name, body in FILES.items():
        assert (package_dir(tmp_path) / name.removeprefix("package/")).read_bytes() == body
    assert port_script(tmp_path) == tmp_path / "node_modules" / PACKAGE / "micropython.mjs"
    assert port_script(tmp_path).is_file()
    assert intact(tmp_path)

    # Present and intact: no request at all, so a second `make test` needs no network.
    assert install(tmp_path, registry.base) is False
    assert registry.requests == [META_PATH, TGZ_PATH]


@pytest.mark.parametrize("damage", ["unpacked file changed", "kept tarball changed", "package removed"])
def test_a_damaged_install_is_fetched_again(registry: Registry, tmp_path: Path, damage: str) -> None:
    registry.publish(tarball(FILES))
    install(tmp_path, registry.base)
    if damage == "unpacked file changed":
        port_script(tmp_path).write_bytes(b"export default 2;\n")
    elif damage == "kept tarball changed":
        tgz = next(tmp_path.glob("*.tgz"))
        tgz.write_bytes(tgz.read_bytes()[:-1])
    else:
        for f in package_dir(tmp_path).iterdir():
            f.unlink()
        package_dir(tmp_path).rmdir()
    assert not intact(tmp_path)
    assert install(tmp_path, registry.base) is True
    assert intact(tmp_path)
    assert port_script(tmp_path).read_bytes() == FILES["package/micropython.mjs"]


def test_a_tarball_whose_sha512_is_not_the_registrys_is_refused(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stated = sri_sha512(b"what the registry published")
    registry.publish(tarball(FILES), integrity=stated)
    with pytest.raises(FetchError) as exc:
        install(tmp_path, registry.base)
    assert exc.value.kind == FetchError.INTEGRITY
    assert stated in str(exc.value)
    assert not package_dir(tmp_path).exists()
    assert not list(tmp_path.glob("*.tgz"))

    assert main(["--dir", str(tmp_path), "--registry", registry.base]) == 1
    err = capsys.readouterr().err
    assert f"{PACKAGE}@{VERSION} not installed: integrity:" in err


def test_a_registry_integrity_without_sha512_is_refused(registry: Registry, tmp_path: Path) -> None:
    data = tarball(FILES)
    registry.publish(data, integrity="sha1-AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(FetchError) as exc:
        install(tmp_path, registry.base)
    assert exc.value.kind == FetchError.INTEGRITY
    assert not package_dir(tmp_path).exists()


def test_metadata_of_another_version_is_refused(registry: Registry, tmp_path: Path) -> None:
    registry.publish(tarball(FILES), version="1.29.0-5")
    with pytest.raises(FetchError) as exc:
        install(tmp_path, registry.base)
    assert exc.value.kind == FetchError.METADATA
    assert "1.29.0-5" in str(exc.value)
    assert registry.requests == [META_PATH]


@pytest.mark.parametrize("bad", ["package/../../escaped.js", "/etc/absolute.js", "elsewhere/file.js", "link"])
def test_a_member_outside_the_package_or_not_a_file_is_refused(
    registry: Registry, tmp_path: Path, bad: str
) -> None:
    if bad == "link":
        data = tarball(FILES, links=("package/passwd",))
    else:
        data = tarball({**FILES, bad: b"x"})
    registry.publish(data)
    root = tmp_path / "root"
    with pytest.raises(FetchError) as exc:
        install(root, registry.base)
    assert exc.value.kind == FetchError.ARCHIVE
    assert not package_dir(root).exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_a_registry_that_cannot_be_reached_or_lacks_the_version_names_the_network(
    registry: Registry, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(FetchError) as exc:
        install(tmp_path, closed)
    assert exc.value.kind == FetchError.NETWORK
    assert closed + META_PATH in str(exc.value)

    with pytest.raises(FetchError) as exc:
        install(tmp_path, registry.base)  # nothing published
    assert exc.value.kind == FetchError.NETWORK
    assert "HTTP 404" in str(exc.value)
