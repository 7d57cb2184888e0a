"""The image build's check of a copied virtualenv: every file a package's RECORD lists is there."""

from __future__ import annotations

from pathlib import Path

from sandbox_runner.records import missing


def test_a_package_directory_left_out_is_found(tmp_path: Path) -> None:
    info = tmp_path / "aiosignal-1.4.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text(
        "aiosignal/__init__.py,sha256=x,1537\naiosignal-1.4.0.dist-info/RECORD,,\n../../../bin/tool,sha256=y,10\n"
    )
    (tmp_path / "aiosignal").mkdir()
    (tmp_path / "aiosignal" / "__init__.py").write_text("")
    (tmp_path.parent / "bin").mkdir(exist_ok=True)
    assert missing(tmp_path) == ["../../../bin/tool"]
    (tmp_path / "aiosignal" / "__init__.py").unlink()
    (tmp_path / "aiosignal").rmdir()
    assert missing(tmp_path) == ["aiosignal/__init__.py", "../../../bin/tool"]
