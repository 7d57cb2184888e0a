"""File uploads on ``execute``: accepted encodings and paths, and every refusal (nothing written, nothing run)."""

from __future__ import annotations

import base64
import itertools

import pytest

from orchestrator.runner_client import RunnerRefused

pytestmark = pytest.mark.anyio

MAX_FILE = 1000
MAX_TOTAL = 2500
MAX_FILES = 4
_markers = itertools.count()


@pytest.fixture(scope="module")
async def runner(start_runner):
    """A runner with small upload caps, so that going over them is cheap."""
    settings = {
        "TCI_RUNNER_MAX_FILE_BYTES": str(MAX_FILE),
        "TCI_RUNNER_MAX_FILES_BYTES": str(MAX_TOTAL),
        "TCI_RUNNER_MAX_FILES": str(MAX_FILES),
    }
    async with start_runner(**settings) as handle:
        yield handle


async def assert_refused(runner, bad_files: list, param: str) -> str:
    """Send a good file followed by ``bad_files`` with code that leaves a trace; check neither happened."""
    marker = f"m{next(_markers)}"
    before = await runner.stats()
    files = [{"name": f"good-{marker}.txt", "content": "fine"}, *bad_files]
    with pytest.raises(RunnerRefused) as caught:
        await runner.execute(f"open('ran-{marker}', 'w').close()", files=files)
    assert caught.value.code == "invalid_file"
    assert caught.value.param == param
    assert caught.value.message
    assert not (runner.workdir / f"good-{marker}.txt").exists(), "a refused request must write nothing"
    assert not (runner.workdir / f"ran-{marker}").exists(), "a refused request must run nothing"
    after = await runner.stats()
    assert after["execute_count"] == before["execute_count"]
    return caught.value.message


async def test_string_and_base64_uploads(runner):
    binary = bytes(range(256))
    files = [
        {"name": "plain.txt", "content": "héllo\n"},
        {"name": "explicit.txt", "content": "x", "encoding": "string"},
        {"name": "blob.bin", "content": base64.b64encode(binary).decode(), "encoding": "base64"},
        {"name": "data/nested/deeper.csv", "content": "a,b\n1,2\n"},
    ]
    result = await runner.execute(
        "print(open('plain.txt', encoding='utf-8').read(), end='')\n"
        "print(len(open('blob.bin', 'rb').read()))\n"
        "print(open('data/nested/deeper.csv').read(), end='')",
        files=files,
    )
    assert result.outcome == "ok", result.outputs
    assert result.text("stdout") == "héllo\n256\na,b\n1,2\n"
    assert (runner.workdir / "blob.bin").read_bytes() == binary
    assert (runner.workdir / "explicit.txt").read_text() == "x"


async def test_upload_replaces_an_existing_file_and_normalises_dot_components(runner):
    await runner.execute("open('replace-me.txt', 'w').write('old contents that are longer')")
    result = await runner.execute(
        "print(open('replace-me.txt').read())", files=[{"name": "./replace-me.txt", "content": "new"}]
    )
    assert result.outputs == [{"type": "stdout", "data": "new\n"}]


async def test_files_within_the_caps_are_accepted(runner):
    files = [{"name": f"cap-{i}.txt", "content": "y" * (MAX_TOTAL // MAX_FILES)} for i in range(MAX_FILES)]
    files[0]["content"] = "y" * MAX_FILE
    files[1]["content"] = "y" * (MAX_TOTAL - MAX_FILE - 2 * (MAX_TOTAL // MAX_FILES))
    assert sum(len(f["content"]) for f in files) == MAX_TOTAL
    result = await runner.execute(
        "import os\nprint(sum(os.path.getsize(f'cap-{i}.txt') for i in range(4)))", files=files
    )
    assert result.outputs == [{"type": "stdout", "data": f"{MAX_TOTAL}\n"}]


@pytest.mark.parametrize(
    ("bad_files", "param"),
    [
        pytest.param([{"name": "/tmp/absolute.txt", "content": "x"}], "files[1].name", id="absolute"),
        pytest.param([{"name": "../escape.txt", "content": "x"}], "files[1].name", id="dotdot"),
        pytest.param([{"name": "sub/../../escape.txt", "content": "x"}], "files[1].name", id="nested-dotdot"),
        pytest.param([{"name": "nul\x00byte.txt", "content": "x"}], "files[1].name", id="nul-byte"),
        pytest.param([{"name": "c" * 256, "content": "x"}], "files[1].name", id="long-component"),
        pytest.param([{"name": "/".join(["d" * 200] * 6), "content": "x"}], "files[1].name", id="long-path"),
        pytest.param([{"name": "", "content": "x"}], "files[1].name", id="empty-name"),
        pytest.param([{"name": ".", "content": "x"}], "files[1].name", id="dot-name"),
        pytest.param([{"name": "dir/", "content": "x"}], "files[1].name", id="trailing-slash"),
        pytest.param([{"name": 7, "content": "x"}], "files[1].name", id="name-not-a-string"),
        pytest.param([{"name": "big.txt", "content": "x" * (MAX_FILE + 1)}], "files[1].content", id="over-size"),
        pytest.param(
            [{"name": "big.bin", "content": base64.b64encode(b"x" * (MAX_FILE + 1)).decode(), "encoding": "base64"}],
            "files[1].content",
            id="over-size-decoded",
        ),
        pytest.param(
            [{"name": f"part-{i}.txt", "content": "x" * 900} for i in range(3)], "files", id="over-total-size"
        ),
        pytest.param(
            [{"name": "bad.bin", "content": "not base64!", "encoding": "base64"}], "files[1].content", id="bad-base64"
        ),
        pytest.param([{"name": "bad.txt", "content": "x", "encoding": "hex"}], "files[1].encoding", id="bad-encoding"),
        pytest.param([{"name": "bad.txt", "content": None}], "files[1].content", id="content-not-a-string"),
        pytest.param(
            [{"name": "dup.txt", "content": "1"}, {"name": "dup.txt", "content": "2"}], "files[2].name", id="dup"
        ),
        pytest.param(
            [{"name": "dup2.txt", "content": "1"}, {"name": "./dup2.txt", "content": "2"}],
            "files[2].name",
            id="dup-dot",
        ),
        pytest.param([{"name": f"many-{i}.txt", "content": "x"} for i in range(MAX_FILES)], "files", id="too-many"),
        pytest.param(["not-an-object"], "files[1]", id="file-not-an-object"),
    ],
)
async def test_refusals(runner, bad_files, param):
    await assert_refused(runner, bad_files, param)


async def test_files_must_be_a_list(runner):
    with pytest.raises(RunnerRefused) as caught:
        await runner.execute("open('ran-not-a-list', 'w').close()", files={"name": "x"})
    assert (caught.value.code, caught.value.param) == ("invalid_file", "files")
    assert not (runner.workdir / "ran-not-a-list").exists()


async def test_symlink_escape_created_by_user_code(runner, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("untouched")
    result = await runner.execute(
        f"import os\nos.symlink({str(outside)!r}, 'link-dir')\nos.symlink({str(outside / 'secret.txt')!r}, 'link-file')"
    )
    assert result.outcome == "ok", result.outputs
    message = await assert_refused(runner, [{"name": "link-dir/planted.txt", "content": "x"}], "files[1].name")
    assert "outside" in message
    await assert_refused(runner, [{"name": "link-file", "content": "overwritten"}], "files[1].name")
    assert not (outside / "planted.txt").exists()
    assert (outside / "secret.txt").read_text() == "untouched"


async def test_symlink_within_the_workdir_is_not_followed(runner):
    result = await runner.execute(
        "import os\nopen('target.txt', 'w').write('original')\nos.symlink('target.txt', 'alias.txt')"
    )
    assert result.outcome == "ok", result.outputs
    await assert_refused(runner, [{"name": "alias.txt", "content": "through the link"}], "files[1].name")
    assert (runner.workdir / "target.txt").read_text() == "original"
    assert (runner.workdir / "alias.txt").is_symlink()


async def test_destination_through_a_loop_of_symlinks(runner):
    assert (await runner.execute("import os\nos.symlink('lp2', 'lp1')\nos.symlink('lp1', 'lp2')")).outcome == "ok"
    for name in ("lp1", "lp1/x.txt"):
        assert "loop" in await assert_refused(runner, [{"name": name, "content": "x"}], "files[1].name")


async def test_destination_that_is_a_directory(runner):
    assert (await runner.execute("import os\nos.makedirs('a-directory/inner')")).outcome == "ok"
    await assert_refused(runner, [{"name": "a-directory", "content": "x"}], "files[1].name")
    assert (runner.workdir / "a-directory" / "inner").is_dir()


async def test_parent_that_is_a_file(runner):
    assert (await runner.execute("open('a-file', 'w').write('keep')")).outcome == "ok"
    await assert_refused(runner, [{"name": "a-file/child.txt", "content": "x"}], "files[1].name")
    assert (runner.workdir / "a-file").read_text() == "keep"


async def test_one_upload_inside_another(runner):
    files = [{"name": "both", "content": "a file"}, {"name": "both/child.txt", "content": "x"}]
    await assert_refused(runner, files, "files[2].name")
    assert not (runner.workdir / "both").exists()
